"""Build the synthetic workspace the README's evaluation examples run on (no downloads).

    uv run python examples/synthetic_workspace.py /tmp/hm-demo

Writes tiny random CLIP and DINOv2 models (as the tests use) to /tmp/hm-demo/models/ and a workspace to
/tmp/hm-demo/workspace/ with two heads of noisy colour images whose classes overlap on purpose:
`hue` (6 classes, neighbouring hues 60 degrees apart with +-35 degrees of jitter) and `warm` (binary: warm
hues against cool ones, with some ambiguous ones on both sides), plus test/hue/ for confusion-matrix.
"""

from __future__ import annotations

import colorsys
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import build_clip, build_dinov2  # noqa: E402

HUES = {"red": 0, "yellow": 60, "green": 120, "cyan": 180, "blue": 240, "magenta": 300}


def hue_image(path: Path, hue: float, rng: np.random.Generator) -> None:
    r, g, b = colorsys.hsv_to_rgb((hue % 360) / 360, rng.uniform(0.4, 1.0), rng.uniform(0.4, 1.0))
    base = np.array([r, g, b]) * 255
    arr = np.clip(base + rng.normal(0, 40, size=(40, 48, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def main(root: Path) -> None:
    rng = np.random.default_rng(7)
    torch.manual_seed(0)  # the tiny models are randomly initialised: seed them so the README's numbers repeat
    build_clip(root / "models" / "tiny-clip")
    build_dinov2(root / "models" / "tiny-dinov2")
    ws = root / "workspace"
    for name, centre in HUES.items():
        for i in range(30):
            hue_image(ws / "heads" / "hue" / name / f"{name}_{i:03d}.png", centre + rng.uniform(-35, 35), rng)
        for i in range(8):
            hue_image(ws / "test" / "hue" / name / f"{name}_t{i:03d}.png", centre + rng.uniform(-35, 35), rng)
    for i in range(60):
        hue_image(ws / "heads" / "warm" / "positive" / f"warm_{i:03d}.png", rng.uniform(-50, 80), rng)
        hue_image(ws / "heads" / "warm" / "negative" / f"cool_{i:03d}.png", rng.uniform(70, 300), rng)
    print(f"Wrote {ws} and models in {root / 'models'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/hm-demo"))
