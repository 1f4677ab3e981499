"""The validation metrics a job can ask for, apart so that every API module can name them."""

from __future__ import annotations

from enum import StrEnum


class Metric(StrEnum):
    CLIP_TEXT = "clipText"
    CLIP_IMAGE = "clipImage"
    DINO = "dino"


# Metrics that compare samples with real images of the subject (a concept's).
SUBJECT_METRICS = frozenset({Metric.CLIP_IMAGE, Metric.DINO})
CLIP_METRICS = frozenset({Metric.CLIP_TEXT, Metric.CLIP_IMAGE})
# Metrics an LCM student scores against its teacher's images (there are no concepts).
TEACHER_METRICS = frozenset({Metric.CLIP_IMAGE})
