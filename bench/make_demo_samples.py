"""Regenerate the sample photos `hm demo` ships (headmaster/heads/demo/samples/) from the clothing photos in ../shared.

    uv run python bench/make_demo_samples.py [--shared ../shared] [--classes hat,pants,shoes,t-shirt]

Training photos come from data/clothing/train/<class>/, held-back photos from data/clothing/validation/<class>/
(photos the head never sees), each a seeded random choice of the sorted file names, so the same arguments
always give the same files. Every photo is EXIF-rotated, resized to `--side` px on its long side and saved as
a JPEG without metadata. SOURCES.csv maps every sample to its original file; LICENSE.md names the licence.
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "headmaster" / "demo" / "samples"
LICENSE = """# The demo's sample photos

Resized copies of photos from the clothing dataset by Alexey Grigorev and contributors
(clothing-dataset-small, https://github.com/alexeygrigorev/clothing-dataset-small), released under
CC0 1.0 Universal (public domain dedication, https://creativecommons.org/publicdomain/zero/1.0/).
SOURCES.csv names the original file of every sample. Regenerate them with `bench/make_demo_samples.py`.
"""


def pick(folder: Path, n: int, rng: random.Random) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if len(files) < n:
        sys.exit(f"{folder} has {len(files)} photos, {n} asked for")
    return sorted(rng.sample(files, n))


def shrink(src: Path, dest: Path, side: int, quality: int) -> None:
    with Image.open(src) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        im.thumbnail((side, side), Image.Resampling.LANCZOS)
        dest.parent.mkdir(parents=True, exist_ok=True)
        im.save(dest, "JPEG", quality=quality, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--classes", default="hat,pants,shoes,t-shirt")
    ap.add_argument("--train", type=int, default=24, help="training photos per class")
    ap.add_argument("--held-back", type=int, default=10, help="held-back photos per class (for the inbox)")
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--quality", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data = args.shared / "data" / "clothing"
    if not data.is_dir():
        sys.exit(f"not found: {data}")
    if OUT.exists():
        shutil.rmtree(OUT)
    rows = []
    for cls in args.classes.split(","):
        rng = random.Random(f"{args.seed}:{cls}")
        for split, source, n in (("train", "train", args.train), ("held-back", "validation", args.held_back)):
            for i, src in enumerate(pick(data / source / cls, n, rng), 1):
                dest = OUT / split / cls / f"{cls}-{i:02d}.jpg"
                shrink(src, dest, args.side, args.quality)
                rows.append((dest.relative_to(OUT).as_posix(), f"{source}/{cls}/{src.name}"))
    (OUT / "LICENSE.md").write_text(LICENSE)
    with open(OUT / "SOURCES.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["sample", "original (data/clothing/...)"])
        w.writerows(rows)
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"Wrote {len(rows)} photos to {OUT.relative_to(REPO)} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
