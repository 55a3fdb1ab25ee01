"""Builders for tests: tiny randomly initialised models of real architectures, and synthetic images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {
    "red": (220, 30, 30),
    "blue": (30, 40, 220),
    "green": (30, 200, 40),
    "yellow": (230, 220, 30),
}

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=32, patch_size=8)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                 bos_token_id=0, eos_token_id=1, pad_token_id=1)


def build_clip(folder: Path, projection_dim: int = 24) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    CLIPModel(CLIPConfig(vision_config=TINY_VISION, text_config=TINY_TEXT, projection_dim=projection_dim)) \
        .save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def build_siglip(folder: Path) -> Path:
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    SiglipModel(SiglipConfig(vision_config=TINY_VISION, text_config=TINY_TEXT)).save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def build_dinov2(folder: Path) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=8)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def colour_image(path: Path, colour: str, seed: int, size: tuple[int, int] = (48, 40), fmt: str | None = None) -> Path:
    """A solid colour with a little noise, so every file has its own content hash."""
    rng = np.random.default_rng(seed)
    base = np.array(COLOURS[colour], dtype=np.int16)
    arr = np.clip(base + rng.integers(-25, 26, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def fill_bucket(folder: Path, colour: str, n: int, start_seed: int = 0, ext: str = ".png") -> list[Path]:
    return [colour_image(folder / f"{colour}_{start_seed + i:03d}{ext}", colour, start_seed + i) for i in range(n)]


def run_hm(args: list[str], workspace: Path, cwd: Path | None = None, extra_env: dict | None = None
           ) -> subprocess.CompletedProcess:
    """Run the real `hm` entry point in a subprocess, offline."""
    env = dict(os.environ, HEADMASTER_WORKSPACE=str(workspace), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "headmaster.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd or workspace.parent, timeout=300)


def build_timm(folder: Path) -> Path:
    """A tiny timm backbone in the Hugging Face timm-wrapper layout (like shared/models/efficientnet-lite0)."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification, TimmWrapperImageProcessor

    pretrained_cfg = {"input_size": [3, 32, 32], "crop_pct": 0.875, "interpolation": "bicubic",
                      "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    config = TimmWrapperConfig(architecture="test_efficientnet", num_labels=3, pretrained_cfg=pretrained_cfg)
    TimmWrapperForImageClassification(config).save_pretrained(folder)
    TimmWrapperImageProcessor(pretrained_cfg=pretrained_cfg, architecture=config.architecture).save_pretrained(folder)
    return folder


ORIGIN = "http://127.0.0.1:7878"  # where the review page's tests serve it (the guard's host and port)


def post_json(client, guard, url: str, body: dict | None = None, **headers):
    """A POST from the page's script: JSON, with the CSRF token (and any other headers given)."""
    return client.post(url, json=body or {}, headers={"x-csrf-token": guard.csrf, **headers})
