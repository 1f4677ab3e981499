"""Where a training image came from, as SDXL's UNet is told (its `time_ids`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageGeometry:
    """An image's size before resizing, the top-left corner of the crop taken from the
    resized image (after any flip), and the size trained at; each as (height, width)."""

    original: tuple[int, int]
    crop: tuple[int, int]
    target: tuple[int, int]

    @classmethod
    def square(cls, resolution: int) -> ImageGeometry:
        """An image that was the training size already: nothing resized or cropped."""
        return cls((resolution, resolution), (0, 0), (resolution, resolution))
