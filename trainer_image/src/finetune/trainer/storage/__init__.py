"""Where files live: local folders and S3, behind one interface, with retries and uploads."""
