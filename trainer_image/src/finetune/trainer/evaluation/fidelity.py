"""The fidelity measures of the DreamBooth paper, as cosine similarities of embeddings.

- CLIP-T (prompt fidelity): each generated image's CLIP image embedding against its
  prompt's CLIP text embedding.
- CLIP-I and DINO (subject fidelity): each generated image's embedding (CLIP's image
  embedding, or the CLS token of a DINO ViT) against every real subject image's;
  the mean over all (sample, reference) pairs. An LCM student's CLIP-I pairs each
  sample with one reference, the teacher's image of the same prompt and seed.

Per-sample values are returned so a caller can average them over any group of samples
(all of them, or those of one concept) and get the same number as a direct mean.
"""

from __future__ import annotations

import torch


def unit(vectors: torch.Tensor) -> torch.Tensor:
    """Rows scaled to length 1 (in float32: half precision loses the third decimal)."""
    vectors = vectors.float()
    norms: torch.Tensor = vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return vectors / norms


def row_cosines(left: torch.Tensor, right: torch.Tensor, what: str) -> torch.Tensor:
    """cos(left i, right i) for two [n, d] sets of embeddings; `what` names `right` in errors."""
    if left.shape != right.shape:
        raise ValueError(f"{left.shape[0]} images but {right.shape[0]} {what}")
    return (unit(left) * unit(right)).sum(dim=-1)


def prompt_fidelity(images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """CLIP-T per sample: cos(image i, prompt i) for [n, d] image and [n, d] text embeddings."""
    return row_cosines(images, prompts, "prompt embeddings")


def paired_fidelity(samples: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """CLIP-I per sample against its own reference: cos(sample i, reference i), as an LCM
    student's sample is compared with the teacher's image of the same prompt and seed."""
    return row_cosines(samples, references, "reference images")


def subject_fidelity(samples: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """CLIP-I or DINO per sample: the mean cosine similarity of sample i to every reference,
    for [n, d] sample and [m, d] reference embeddings."""
    if references.shape[0] == 0:
        raise ValueError("no reference embeddings to compare with")
    return (unit(samples) @ unit(references).T).mean(dim=1)


def mean(values: torch.Tensor) -> float:
    return float(values.mean())
