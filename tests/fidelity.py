"""Fidelity scores computed directly with transformers' own calls, for tests to hold
the trainer's numbers against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def direct_scores(
    clip: Path, dino: Path, prompts: list[str], samples: list[list[Any]], references: list[Any]
) -> dict[str, float]:
    """The three metrics with transformers' own calls, written out here."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, ViTModel

    model = CLIPModel.from_pretrained(clip).eval()
    processor = AutoImageProcessor.from_pretrained(clip)
    tokenizer = AutoTokenizer.from_pretrained(clip)
    flat = [image for group in samples for image in group]
    with torch.no_grad():
        image = model.get_image_features(**processor(images=flat, return_tensors="pt"))
        text = model.get_text_features(**tokenizer(prompts, padding=True, return_tensors="pt"))
        reference = model.get_image_features(**processor(images=references, return_tensors="pt"))
        vit = ViTModel.from_pretrained(dino, add_pooling_layer=False).eval()
        vit_processor = AutoImageProcessor.from_pretrained(dino)
        cls = vit(**vit_processor(images=flat, return_tensors="pt")).last_hidden_state[:, 0]
        cls_ref = vit(**vit_processor(images=references, return_tensors="pt")).last_hidden_state[
            :, 0
        ]
    image, text, reference = image.pooler_output, text.pooler_output, reference.pooler_output
    owner = [i for i, group in enumerate(samples) for _ in group]
    clip_t = [float(F.cosine_similarity(image[k], text[owner[k]], dim=0)) for k in range(len(flat))]
    clip_i = [float(F.cosine_similarity(a, b, dim=0)) for a in image for b in reference]
    dino_i = [float(F.cosine_similarity(a, b, dim=0)) for a in cls for b in cls_ref]
    return {
        "clipText": float(np.mean(clip_t)),
        "clipImage": float(np.mean(clip_i)),
        "dino": float(np.mean(dino_i)),
    }


def direct_clip_scores(
    clip: Path, prompts: list[str], samples: list[list[Any]], teacher: list[list[Any]]
) -> dict[str, float]:
    """An LCM student's clipText, and its clipImage to the teacher's image of the same
    prompt and seed (`teacher` in the shape of `samples`), with transformers' own calls."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip).eval()
    processor = AutoImageProcessor.from_pretrained(clip)
    tokenizer = AutoTokenizer.from_pretrained(clip)
    flat = [image for group in samples for image in group]
    paired = [image for group in teacher for image in group]
    with torch.no_grad():
        image = model.get_image_features(**processor(images=flat, return_tensors="pt"))
        text = model.get_text_features(**tokenizer(prompts, padding=True, return_tensors="pt"))
        reference = model.get_image_features(**processor(images=paired, return_tensors="pt"))
    image, text, reference = image.pooler_output, text.pooler_output, reference.pooler_output
    owner = [i for i, group in enumerate(samples) for _ in group]
    clip_t = [float(F.cosine_similarity(image[k], text[owner[k]], dim=0)) for k in range(len(flat))]
    clip_i = [float(F.cosine_similarity(image[k], reference[k], dim=0)) for k in range(len(flat))]
    return {"clipText": float(np.mean(clip_t)), "clipImage": float(np.mean(clip_i))}
