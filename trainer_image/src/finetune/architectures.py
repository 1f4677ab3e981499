"""The real Stable Diffusion architectures as configs, for models with random weights.

Speed and memory depend on the architecture, not the weights, so `finetune.assets` builds
these from configs (no download) for honest benchmark figures. The values are those of
the published pipelines' `config.json` files; the tokenizer is ours (a small byte-level
one), so the vocabulary is at least CLIP's 49408 rows.
"""

from __future__ import annotations

from typing import Any

CLIP_VOCAB = 49408


def _clip_vit_l(vocab_size: int) -> dict[str, Any]:
    """CLIP ViT-L/14's text tower: SD 1.5's only text encoder, SDXL's first."""
    return {
        "vocab_size": max(vocab_size, CLIP_VOCAB),
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    }


def _sd_vae(sample_size: int) -> dict[str, Any]:
    return {
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "latent_channels": 4,
        "layers_per_block": 2,
        "sample_size": sample_size,
    }


def sd15(vocab_size: int) -> dict[str, dict[str, Any]]:
    """Stable Diffusion 1.5: UNet, CLIP ViT-L/14 text encoder, the SD VAE."""
    return {
        "unet": {
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "sample_size": 64,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "down_block_types": (
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            "up_block_types": (
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ),
        },
        "vae": _sd_vae(512),
        "text": _clip_vit_l(vocab_size),
    }


def sdxl_base(vocab_size: int) -> dict[str, dict[str, Any]]:
    """Stable Diffusion XL base 1.0: a 2.6B-parameter UNet with 1, 2 and 10 transformer
    layers per level, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (projected to 1280) side by
    side as its 2048-wide cross-attention input, and the SDXL VAE (fp32 only: it
    overflows in fp16)."""
    time_dim = 256
    return {
        "text": _clip_vit_l(vocab_size),
        "text_2": {
            "vocab_size": max(vocab_size, CLIP_VOCAB),
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "max_position_embeddings": 77,
            "projection_dim": 1280,
            "hidden_act": "gelu",
        },
        "unet": {
            "block_out_channels": (320, 640, 1280),
            "layers_per_block": 2,
            "sample_size": 128,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10),
            "attention_head_dim": (5, 10, 20),
            "cross_attention_dim": 768 + 1280,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": time_dim,
            # Six time ids (original size, crop corner, target size) and bigG's pooled 1280.
            "projection_class_embeddings_input_dim": 6 * time_dim + 1280,
        },
        "vae": {**_sd_vae(1024), "scaling_factor": 0.13025, "force_upcast": True},
    }
