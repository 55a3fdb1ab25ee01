"""A model's image preprocessing as data: resize, centre crop, scale, mean/std, done with Pillow and numpy.

`spec_from_processor` reads the rule off a loaded Hugging Face image processor (the torch side, once,
at export time); `PreprocessSpec.apply` repeats it without torch or transformers, so a cached ONNX
backbone embeds with nothing heavier than onnxruntime. The arithmetic follows the processors' PIL
path step by step (Pillow's resize, the same crop rounding, float32 scaling), so the arrays are
equal to the processor's to float rounding; tests/test_onnx.py checks it for every family we support.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from headmaster import HeadmasterError

# Pillow's resampling filters by the names processors and timm use
RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
            "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
RESAMPLE_NAMES = {int(v): k for k, v in RESAMPLE.items()}


@dataclass(frozen=True)
class PreprocessSpec:
    """How pixels are made from an RGB image; stored in the export's JSON.

    resize: "shortest_edge" (the shorter side becomes `size[0]`, the other keeps the aspect ratio,
    truncated) or "exact" (to `size` = (height, width)). crop: (height, width) of a centre crop, or
    None. crop_rounding: "floor" (transformers) or "round" (torchvision, used by timm) for the
    crop's top-left corner.
    """

    resize: str
    size: tuple[int, ...]
    resample: str
    crop: tuple[int, int] | None
    crop_rounding: str
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the arrays `apply` returns."""
        if self.crop:
            return self.crop
        return (self.size[0], self.size[0]) if self.resize == "shortest_edge" else (self.size[0], self.size[1])

    @property
    def input_side(self) -> int:
        """The shorter side images are resized to (what decoding must not go below)."""
        return int(self.size[0]) if self.resize == "shortest_edge" else int(min(self.size))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PreprocessSpec":
        crop = data.get("crop")
        return cls(data["resize"], tuple(int(v) for v in data["size"]), data["resample"],
                   tuple(int(v) for v in crop) if crop else None, data.get("crop_rounding", "floor"),
                   float(data["scale"]), tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]))

    def resized(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if self.resize == "shortest_edge":
            side = int(self.size[0])
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(side * long / short)
            new_w, new_h = (side, new_long) if w <= h else (new_long, side)
        else:
            new_h, new_w = int(self.size[0]), int(self.size[1])
        if (new_w, new_h) == (w, h):
            return image
        return image.resize((new_w, new_h), RESAMPLE[self.resample])

    def apply_one(self, image: Image.Image) -> np.ndarray:
        """(3, H, W) float32 for one RGB image."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        arr = np.asarray(self.resized(image))
        if self.crop:
            arr = centre_crop(arr, self.crop, self.crop_rounding)
        x = arr.astype(np.float32) * np.float32(self.scale)
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)

    def apply(self, images: list[Image.Image]) -> np.ndarray:
        """(N, 3, H, W) float32, like the processor's pixel_values."""
        return np.stack([self.apply_one(im) for im in images])


def centre_crop(arr: np.ndarray, crop: tuple[int, int], rounding: str) -> np.ndarray:
    """A centre crop of an (H, W, C) array; a side smaller than the crop is padded with zeros (as processors do)."""
    ch, cw = crop
    h, w = arr.shape[:2]
    if h < ch or w < cw:
        padded = np.zeros((max(h, ch), max(w, cw), arr.shape[2]), dtype=arr.dtype)
        top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
        padded[top:top + h, left:left + w] = arr
        arr, (h, w) = padded, padded.shape[:2]
    if rounding == "round":
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    else:
        top, left = (h - ch) // 2, (w - cw) // 2
    return arr[top:top + ch, left:left + cw]


# -- reading the rule off a processor (torch side, at export time) ------------------------------------

def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def _resample_name(value: Any) -> str:
    if isinstance(value, str) and value.lower() in RESAMPLE:
        return value.lower()
    try:
        return RESAMPLE_NAMES[int(value)]
    except (TypeError, ValueError, KeyError):
        raise HeadmasterError(f"unknown resampling filter {value!r}") from None


def _timm_spec(data_config: dict) -> PreprocessSpec:
    """timm's eval transform: resize the shorter side to floor(size / crop_pct), centre crop, normalise."""
    _, h, w = (int(v) for v in data_config["input_size"])
    if h != w:
        raise HeadmasterError(f"timm input size {h}x{w} is not square")
    if data_config.get("crop_mode", "center") != "center":
        raise HeadmasterError(f"timm crop mode '{data_config.get('crop_mode')}' is not supported")
    crop_pct = float(data_config.get("crop_pct") or 1.0)
    side = math.floor(h / crop_pct)
    return PreprocessSpec("shortest_edge", (side,), _resample_name(data_config.get("interpolation", "bilinear")),
                          (h, w), "round", 1 / 255, tuple(data_config["mean"]), tuple(data_config["std"]))


def spec_from_processor(processor: Any) -> PreprocessSpec:
    """The processor's rule as a PreprocessSpec; HeadmasterError naming what cannot be reproduced."""
    data_config = getattr(processor, "data_config", None)
    if isinstance(data_config, dict) and "input_size" in data_config:
        return _timm_spec(data_config)
    name = type(processor).__name__
    for unsupported in ("crop_pct", "do_pad", "do_reduce_labels"):  # ConvNeXT-style and segmentation rules
        if getattr(processor, unsupported, None):
            raise HeadmasterError(f"{name} uses '{unsupported}', which the ONNX preprocessing does not reproduce")
    if not getattr(processor, "do_resize", True):
        raise HeadmasterError(f"{name} does not resize images")
    size = processor.size
    if _get(size, "shortest_edge"):
        resize, dims = "shortest_edge", (int(_get(size, "shortest_edge")),)
        if _get(size, "longest_edge"):
            raise HeadmasterError(f"{name} limits the longest edge, which the ONNX preprocessing does not reproduce")
    elif _get(size, "height") and _get(size, "width"):
        resize, dims = "exact", (int(_get(size, "height")), int(_get(size, "width")))
    else:
        raise HeadmasterError(f"{name} has a size rule {dict(size) if isinstance(size, dict) else size!r} "
                              f"that the ONNX preprocessing does not reproduce")
    crop = None
    if getattr(processor, "do_center_crop", False):
        c = processor.crop_size
        crop = (int(_get(c, "height")), int(_get(c, "width")))
    scale = float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0
    if getattr(processor, "do_normalize", True):
        mean, std = processor.image_mean, processor.image_std
        mean = tuple(float(v) for v in (mean if isinstance(mean, (list, tuple)) else [mean] * 3))
        std = tuple(float(v) for v in (std if isinstance(std, (list, tuple)) else [std] * 3))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return PreprocessSpec(resize, dims, _resample_name(getattr(processor, "resample", "bicubic")), crop, "floor",
                          scale, mean, std)
