"""Where files live: one `Store` interface over local folders and S3 (`store`, `local`,
`s3`), the one retry policy (`retries`), files written whole (`files`), a job's inputs
resolved into the local cache (`inputs`, with `hub` snapshots), and the background
uploader (`uploader`)."""
