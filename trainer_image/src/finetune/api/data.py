"""What a job learns from (`data`): concepts with their instance and class images, or an
image-caption dataset for LCM distillation, and how images are prepared."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from .common import ApiModel, Prompt, StorageUri

MAX_CONCEPTS = 16


class ClassImages(ApiModel):
    """Regularisation images for prior preservation."""

    uri: StorageUri | None = Field(
        default=None,
        description=(
            "Folder or `s3://` prefix of class images. Missing images (fewer than `count`) "
            "are generated with the base model from the class prompt and stored here for "
            "reuse; without a URI they are stored under the output."
        ),
    )
    count: int = Field(default=100, ge=1, le=10000, description="How many class images to use.")


class Concept(ApiModel):
    """One subject or style to teach the model."""

    instance_images: StorageUri = Field(
        description=(
            "Folder or `s3://` prefix of the concept's images (PNG, JPEG or WebP); hidden "
            "files (a name starting with `.`, such as macOS's `._NAME.jpg`) are skipped."
        )
    )
    instance_prompt: Prompt = Field(
        description="Prompt naming the concept, e.g. `a photo of sks dog`."
    )
    caption_files: bool = Field(
        default=True,
        description=(
            "Use `NAME.txt` (UTF-8) beside `NAME.png`/`NAME.jpg` as that image's prompt; "
            "images without one use `instancePrompt`. With customDiffusion each caption must "
            "hold one of the concept's modifier tokens."
        ),
    )
    class_prompt: Prompt | None = Field(
        default=None,
        description="Prompt for the concept's class, e.g. `a photo of dog`. Needed for prior preservation.",
    )
    class_images: ClassImages = Field(
        default_factory=ClassImages,
        description="Class images for prior preservation (only read when it is on).",
    )
    hold_out: int = Field(
        default=0,
        ge=0,
        le=10000,
        description=(
            "Instance images kept out of training (the last N by file name), the real "
            "images `validation.metrics` compare samples with; 0: compare with all of them. "
            "Must leave at least one image to train on."
        ),
    )


class DatasetFormat(StrEnum):
    AUTO = "auto"
    FOLDER = "folder"
    WEBDATASET = "webdataset"


class CaptionDataset(ApiModel):
    """An image-caption dataset, for LCM distillation."""

    uri: StorageUri = Field(
        description=(
            "Folder of images with `NAME.txt` captions, a folder or `s3://` prefix of "
            "webdataset `.tar` shards, or an `s3://` prefix of images with captions. Hidden "
            "files and folders (`._NAME.jpg`, `__MACOSX/` of a zip made on a Mac) are skipped."
        ),
    )
    format: DatasetFormat = Field(
        default=DatasetFormat.AUTO,
        description="`folder`, `webdataset`, or `auto` (shards when the URI holds `.tar` files).",
    )


class AlphaMode(StrEnum):
    WHITE = "white"
    BLACK = "black"
    REFUSE = "refuse"


class DataSpec(ApiModel):
    """What the model learns from, and how images are prepared."""

    concepts: list[Concept] = Field(
        default_factory=list,
        max_length=MAX_CONCEPTS,
        description=(
            "Concepts for dreambooth, lora and customDiffusion (customDiffusion takes several "
            "at once; the others train each concept's images together)."
        ),
    )
    dataset: CaptionDataset | None = Field(
        default=None, description="Image-caption dataset for lcm and lcmLora."
    )
    resolution: int = Field(
        default=512,
        ge=64,
        le=4096,
        multiple_of=8,
        description=(
            "Training resolution in pixels; images are resized so the short side matches "
            "(with `buckets`, to cover a bucket of about this size squared)."
        ),
    )
    center_crop: bool = Field(
        default=False,
        description="Crop the centre square (or bucket); otherwise a random crop.",
    )
    random_flip: bool = Field(default=False, description="Flip images horizontally at random.")
    buckets: bool | None = Field(
        default=None,
        description=(
            "Aspect-ratio buckets for concept images: each image keeps its aspect ratio, "
            "resized to cover the bucket (width x height, multiples of 64 px, about "
            "`resolution`² pixels, 1:4 to 4:1) of nearest aspect ratio and cropped to it "
            "(as `centerCrop` says); each micro-batch comes from one bucket, and SDXL is told "
            "each image's real size and crop. The log lists the buckets and how many images "
            "each holds. With prior preservation a batch's class images are cropped to its "
            "bucket. Unset: the model family's default (on for sdxl, off for sd); true or "
            "false forces it. Not for lcm/lcmLora datasets or customDiffusion's "
            "`augmentation` (square images; unset turns buckets off there)."
        ),
    )
    alpha: AlphaMode = Field(
        default=AlphaMode.WHITE,
        description=(
            "Images with transparent pixels (RGBA, LA, transparent palettes): composited on "
            "`white` or `black`, or `refuse`d with an error naming the file."
        ),
    )
    min_image_size: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description=(
            "Refuse images whose short side is below this many pixels. Unset: images below "
            "half of `resolution` are used with a warning."
        ),
    )
