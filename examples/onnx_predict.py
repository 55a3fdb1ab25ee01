"""Classify a folder with a headmaster ONNX export, using only onnxruntime, numpy and Pillow.

    hm export --dest export --format onnx          # classifier.onnx + classifier.json
    python examples/onnx_predict.py export photos/ # one CSV row per image, like
                                                   # `hm classify --heads A,B --src photos --format csv`

No torch, no transformers, no headmaster: copy this file next to the export and it runs anywhere
onnxruntime does. Everything it needs to know is in classifier.json: how to resize, crop and
normalise (the `preprocess` block), the class names of each head's output, the thresholds and
the "uncertain" rules.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
            "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


def shorter_side(pre: dict) -> int:
    return int(pre["size"][0]) if pre["resize"] == "shortest_edge" else int(min(pre["size"]))


def load_rgb(path: Path, min_side: int) -> Image.Image:
    """Decode (JPEGs at a reduced scale no smaller than the model needs, as headmaster does), EXIF-rotate,
    RGB with transparency on white."""
    with Image.open(path) as img:
        if img.format == "JPEG":
            w, h = img.size
            scale = min_side / min(w, h)
            img.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
        img.load()
        img = ImageOps.exif_transpose(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return img.convert("RGB")


def preprocess(img: Image.Image, pre: dict) -> np.ndarray:
    """The JSON's rule: resize, centre crop, scale, (x - mean) / std, channels first."""
    w, h = img.size
    if pre["resize"] == "shortest_edge":
        side = int(pre["size"][0])
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(side * long / short)
        size = (side, new_long) if w <= h else (new_long, side)
    else:
        size = (int(pre["size"][1]), int(pre["size"][0]))
    if size != (w, h):
        img = img.resize(size, RESAMPLE[pre["resample"]])
    arr = np.asarray(img)
    if pre.get("crop"):
        ch, cw = pre["crop"]
        h, w = arr.shape[:2]
        if h < ch or w < cw:  # smaller than the crop: pad with zeros around the centre
            padded = np.zeros((max(h, ch), max(w, cw), 3), dtype=arr.dtype)
            top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
            padded[top:top + h, left:left + w] = arr
            arr, (h, w) = padded, padded.shape[:2]
        if pre.get("crop_rounding") == "round":
            top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        else:
            top, left = (h - ch) // 2, (w - cw) // 2
        arr = arr[top:top + ch, left:left + cw]
    x = arr.astype(np.float32) * np.float32(pre["scale"])
    x = (x - np.asarray(pre["mean"], dtype=np.float32)) / np.asarray(pre["std"], dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def decide(probs: np.ndarray, head: dict) -> tuple[str, float]:
    """The bucket, or 'uncertain': binary within the margin of the threshold, multi-class below min_confidence."""
    rule = head["uncertain"]
    if head["type"] == "binary":
        p, t = float(probs[1]), rule["threshold"]
        return ("uncertain" if abs(p - t) <= rule["margin"] else head["classes"][int(p >= t)]), p
    i = int(np.argmax(probs))
    return ("uncertain" if probs[i] < rule["min_confidence"] else head["classes"][i]), float(probs[i])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, help="Folder with classifier.onnx and classifier.json (or the .json).")
    parser.add_argument("folder", type=Path, help="Folder of images to classify (not recursive).")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    meta_path = args.export if args.export.suffix == ".json" else args.export / "classifier.json"
    meta = json.loads(meta_path.read_text())
    session = ort.InferenceSession(str(meta_path.with_suffix(".onnx")), providers=["CPUExecutionProvider"])
    pre, heads = meta["preprocess"], meta["heads"]
    outputs = [o.name for o in session.get_outputs()]
    images = sorted(n for n in os.listdir(args.folder)
                    if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
                    and (args.folder / n).is_file())
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["image"] + [f"{h}_{c}" for h, entry in heads.items() for c in [*entry["classes"], "prediction"]])
    for start in range(0, len(images), args.batch_size):
        names, pixels = [], []
        for name in images[start:start + args.batch_size]:
            try:
                pixels.append(preprocess(load_rgb(args.folder / name, shorter_side(pre)), pre))
                names.append(name)
            except (OSError, ValueError, SyntaxError) as e:
                print(f"Skipped {name}: {e}", file=sys.stderr)
        if not pixels:
            continue
        results = dict(zip(outputs, session.run(None, {meta["input"]["name"]: np.stack(pixels)})))
        for i, name in enumerate(names):
            row = [name]
            for head, entry in heads.items():
                probs = results[entry["output"]][i]
                row += [f"{float(p):.4f}" for p in probs] + [decide(probs, entry)[0]]
            writer.writerow(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
