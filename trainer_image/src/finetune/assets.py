"""Build small diffusers models and image sets from configs, with no download.

The quickstart, the tests and the benchmarks need a real Stable Diffusion
pipeline folder (loaded through the real `from_pretrained`), but nothing here
may reach a model hub. `build_model` writes one with random weights: `tiny`
trains in seconds on a CPU; `sd15` has the real SD 1.5 architecture (UNet,
CLIP ViT-L/14 text encoder, SD VAE) for honest speed and memory figures.
`build_sdxl_model` writes a Stable Diffusion XL folder (two text encoders, the
second with projection; a UNet with SDXL's added text-and-time embedding): `tiny`, or
`base`, the SDXL base 1.0 architecture. The real architectures' configs live in
`finetune.architectures`.
`build_evaluators` writes the CLIP and DINO folders that validation metrics
(`validation.metrics`) load, likewise tiny or at the real architectures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from finetune import architectures

Size = Literal["tiny", "sd15"]
SdxlSize = Literal["tiny", "base"]

_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (as in GPT-2/CLIP)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra, chars = 0, []
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tokenizer(folder: Path) -> int:
    """A character-level CLIP tokenizer: every byte, alone or ending a word. Returns its size."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = alphabet + [f"{c}</w>" for c in alphabet] + list(_SPECIAL)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": _SPECIAL[0],
        "eos_token": _SPECIAL[1],
        "unk_token": _SPECIAL[1],
        "pad_token": _SPECIAL[1],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return len(tokens)


def _configs(size: Size, vocab_size: int) -> dict[str, dict[str, Any]]:
    if size == "tiny":
        return {
            "unet": {
                "block_out_channels": (32, 64),
                "layers_per_block": 1,
                "sample_size": 32,
                "in_channels": 4,
                "out_channels": 4,
                "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
                "cross_attention_dim": 32,
                "attention_head_dim": 4,
                "norm_num_groups": 8,
            },
            "vae": {
                "block_out_channels": (16, 32),
                "in_channels": 3,
                "out_channels": 3,
                "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
                "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
                "latent_channels": 4,
                "norm_num_groups": 8,
                "sample_size": 64,
            },
            "text": {
                "vocab_size": vocab_size,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": 77,
                "projection_dim": 32,
            },
        }
    return architectures.sd15(vocab_size)


def build_model(
    folder: str | Path, size: Size = "tiny", seed: int = 0, prediction_type: str = "epsilon"
) -> Path:
    """Write a randomly initialised Stable Diffusion pipeline folder and return its path;
    `prediction_type="v_prediction"` makes it predict v, as Stable Diffusion 2.x does."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    tokenizer_dir = folder / "tokenizer"
    vocab_size = write_tokenizer(tokenizer_dir)
    configs = _configs(size, vocab_size)
    torch.manual_seed(seed)
    pipeline = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**configs["unet"]),
        vae=AutoencoderKL(**configs["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text"])),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        scheduler=DDPMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            clip_sample=False,
            steps_offset=1,
            prediction_type=prediction_type,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return folder


def _sdxl_configs(size: SdxlSize, vocab_size: int) -> dict[str, dict[str, Any]]:
    """`tiny`: the encoders' widths differ (32 and 48), so a UNet that read only one of
    them, or the wrong layer's width, would not load."""
    if size == "base":
        return architectures.sdxl_base(vocab_size)
    text = {
        "vocab_size": vocab_size,
        "intermediate_size": 64,
        "num_hidden_layers": 3,  # SDXL reads the penultimate layer
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "projection_dim": 32,
    }
    time_dim = 8
    return {
        "text": {**text, "hidden_size": 32},
        "text_2": {**text, "hidden_size": 48},
        "unet": {
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "sample_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "cross_attention_dim": 32 + 48,
            "attention_head_dim": (2, 4),
            "transformer_layers_per_block": (1, 2),
            "use_linear_projection": True,
            "norm_num_groups": 8,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": time_dim,
            # Six time ids (original size, crop corner, target size) and the pooled text.
            "projection_class_embeddings_input_dim": 6 * time_dim + 32,
        },
        "vae": {
            **_configs("tiny", vocab_size)["vae"],
            "scaling_factor": 0.13025,
            "force_upcast": True,
        },
    }


def build_sdxl_model(folder: str | Path, seed: int = 0, size: SdxlSize = "tiny") -> Path:
    """Write a randomly initialised Stable Diffusion XL pipeline folder (with the Euler
    scheduler SDXL ships with) and return its path. `base` (3.5B parameters) is
    initialised on the GPU when there is one: on a CPU that alone takes minutes."""
    import shutil

    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    folder = Path(folder)
    vocab_size = write_tokenizer(folder / "tokenizer")
    shutil.copytree(folder / "tokenizer", folder / "tokenizer_2", dirs_exist_ok=True)
    torch.manual_seed(seed)
    on_gpu = size != "tiny" and torch.cuda.is_available()
    with torch.device("cuda" if on_gpu else "cpu"):
        models = _sdxl_models(_sdxl_configs(size, vocab_size))
    pipeline = StableDiffusionXLPipeline(
        **models,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            steps_offset=1,
            timestep_spacing="leading",
        ),
        add_watermarker=False,
    )
    pipeline.save_pretrained(folder)
    return folder


def _sdxl_models(configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return {
        "unet": UNet2DConditionModel(**configs["unet"]),
        "vae": AutoencoderKL(**configs["vae"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text"])),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_2"])),
    }


def _evaluator_configs(size: Size, vocab_size: int) -> dict[str, dict[str, Any]]:
    """CLIP (text and vision towers) and a DINO ViT. `sd15` is CLIP ViT-L/14 and DINO ViT-S/16,
    the architectures `validation.evaluator` defaults to."""
    eos = vocab_size - 1  # write_tokenizer puts the special tokens last
    if size == "tiny":
        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
        text["num_attention_heads"] = 4
        vision = {**text, "image_size": 32, "patch_size": 8}
        dino = {**text, "image_size": 32, "patch_size": 8}
        projection = 32
    else:
        text = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12}
        text["num_attention_heads"] = 12
        vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24}
        vision.update(num_attention_heads=16, image_size=224, patch_size=14)
        dino = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 12}
        dino.update(num_attention_heads=6, image_size=224, patch_size=16)
        projection = 768
    return {
        "text": {
            **text,
            "vocab_size": max(vocab_size, 49408) if size == "sd15" else vocab_size,
            "max_position_embeddings": 77,
            "bos_token_id": eos - 1,
            "eos_token_id": eos,
            "pad_token_id": eos,
            "hidden_act": "quick_gelu",
        },
        "vision": {**vision, "hidden_act": "quick_gelu"},
        "projection": {"projection_dim": projection},
        "dino": {**dino, "qkv_bias": True},
    }


def build_evaluators(folder: str | Path, size: Size = "tiny", seed: int = 0) -> tuple[Path, Path]:
    """Write randomly initialised CLIP and DINO folders (`FOLDER/clip`, `FOLDER/dino`) in
    the hub repositories' layout, tokenizer and image processors included; return them."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    folder = Path(folder)
    clip, dino = folder / "clip", folder / "dino"
    configs = _evaluator_configs(size, write_tokenizer(clip))
    pixels = configs["vision"]["image_size"]
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=configs["text"], vision_config=configs["vision"], **configs["projection"]
    )
    CLIPModel(config).save_pretrained(clip)
    CLIPImageProcessor(
        size={"shortest_edge": pixels}, crop_size={"height": pixels, "width": pixels}
    ).save_pretrained(clip)
    ViTModel(ViTConfig(**configs["dino"]), add_pooling_layer=False).save_pretrained(dino)
    ViTImageProcessor(
        size={"height": pixels, "width": pixels},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(dino)
    return clip, dino


def write_images(
    folder: str | Path, count: int, resolution: int = 64, seed: int = 0, caption: str | None = None
) -> Path:
    """Write `count` PNGs of a simple subject (a coloured disc on a plain ground)."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:resolution, 0:resolution]
    for index in range(count):
        ground = rng.integers(150, 255, size=3)
        disc = np.array([200, 40, 40]) + rng.integers(-30, 30, size=3)
        cx, cy = rng.uniform(0.35, 0.65, size=2) * resolution
        radius = rng.uniform(0.2, 0.3) * resolution
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 < radius**2
        pixels = np.where(inside[..., None], disc, ground).clip(0, 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"image-{index:03d}.png")
        if caption is not None:
            (folder / f"image-{index:03d}.txt").write_text(caption)
    return folder


def write_captioned_images(
    folder: str | Path, colours: tuple[str, ...], per_colour: int, resolution: int = 64
) -> Path:
    """Discs of several colours in one folder, each image captioned with its colour."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rgb = {
        "red": (200, 40, 40),
        "green": (40, 170, 60),
        "blue": (40, 60, 200),
        "yellow": (220, 200, 40),
    }
    rng = np.random.default_rng(len(colours))
    yy, xx = np.mgrid[0:resolution, 0:resolution]
    for colour in colours:
        for index in range(per_colour):
            ground = rng.integers(150, 255, size=3)
            cx, cy = rng.uniform(0.35, 0.65, size=2) * resolution
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 < (rng.uniform(0.2, 0.3) * resolution) ** 2
            disc = np.array(rgb.get(colour, (128, 128, 128)))
            pixels = np.where(inside[..., None], disc, ground).astype("uint8")
            Image.fromarray(pixels).save(folder / f"{colour}-{index:03d}.png")
            (folder / f"{colour}-{index:03d}.txt").write_text(f"a {colour} disc")
    return folder


def write_shards(images: str | Path, folder: str | Path, per_shard: int) -> Path:
    """A folder of captioned images (NAME.png + NAME.txt) as webdataset `.tar` shards."""
    import tarfile

    images, folder = Path(images), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pngs = sorted(images.glob("*.png"))
    for start in range(0, len(pngs), per_shard):
        with tarfile.open(folder / f"shard-{start // per_shard:05d}.tar", "w") as tar:
            for png in pngs[start : start + per_shard]:
                tar.add(png, arcname=png.name)
                tar.add(png.with_suffix(".txt"), arcname=png.with_suffix(".txt").name)
    return folder


def quickstart(folder: str | Path) -> None:
    """The quickstart's tiny model and images, made once."""
    folder = Path(folder)
    if not (folder / "model" / "model_index.json").exists():
        build_model(folder / "model")
    if not (folder / "images").exists():
        write_images(folder / "images", 8, resolution=64)
    if not (folder / "evaluators" / "dino" / "config.json").exists():
        build_evaluators(folder / "evaluators")
    print(
        f"tiny model in {folder / 'model'}, 8 images in {folder / 'images'}, "
        f"tiny CLIP and DINO in {folder / 'evaluators'}"
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m finetune.assets",
        description="Build the quickstart's tiny random model, 8 images and tiny CLIP and "
        "DINO evaluators into FOLDER (what exists already is kept); nothing is downloaded.",
    )
    parser.add_argument("folder", nargs="?", default="examples/quickstart", metavar="FOLDER")
    quickstart(parser.parse_args().folder)
