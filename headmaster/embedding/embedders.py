"""Frozen vision backbones: load any Hugging Face vision model and turn pixels into vectors.

One factory (`load_embedder`) and two small tables: MODEL_KINDS says how a registered
path loads (a folder `hm finetune` wrote, else transformers' from_pretrained), and the
first of FEATURE_RULES whose test matches the model decides how the embedding is taken.
Adding a model family or a kind of folder means adding a row, not an if-chain at the
call sites.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from headmaster import HeadmasterError
from headmaster.embedding import adapted


def _as_tensor(output: Any) -> torch.Tensor:
    """transformers 5 returns model outputs where 4.x returned tensors; accept both."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("image_embeds", "pooler_output"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find an embedding in {type(output).__name__}")


def _image_features(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    return _as_tensor(model.get_image_features(pixel_values=pixels))


def _pooled(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixels).pooler_output


def _mean_hidden(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    hidden = model(pixel_values=pixels).last_hidden_state
    # tokens (B, T, D) average over T; feature maps (B, C, H, W) average over H, W
    return hidden.mean(dim=1) if hidden.dim() == 3 else hidden.flatten(2).mean(dim=2)


def _has_pooler(model: Any) -> bool:
    # Decided by a probe forward pass in load_embedder; models without pooling return None there.
    return getattr(model, "_headmaster_has_pooler", False)


@dataclass(frozen=True)
class FeatureRule:
    name: str
    applies: Callable[[Any], bool]
    extract: Callable[[Any, torch.Tensor], torch.Tensor]


# First match wins: CLIP/SigLIP project into their joint space; DINOv2 and other
# ViTs/CNNs (timm wrappers included) give a pooled vector; anything else is averaged.
FEATURE_RULES: tuple[FeatureRule, ...] = (
    FeatureRule("get_image_features", lambda m: hasattr(m, "get_image_features"), _image_features),
    FeatureRule("pooler_output", _has_pooler, _pooled),
    FeatureRule("mean_last_hidden_state", lambda m: True, _mean_hidden),
)


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` if given, else cuda, then mps, then cpu."""
    if requested and requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise HeadmasterError(f"unknown device '{requested}' (use cpu, cuda, cuda:N or mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise HeadmasterError("--device cuda asked for, but no CUDA GPU is available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise HeadmasterError("--device mps asked for, but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """Half precision on GPUs (bf16 where supported), full precision on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("timm").setLevel(logging.ERROR)


@dataclass
class Embedder:
    """A loaded backbone and its image processor, ready to embed."""

    name: str
    path: str
    model: Any
    processor: Any
    rule: FeatureRule
    device: torch.device
    dtype: torch.dtype
    dim: int
    memory_format: torch.memory_format = torch.contiguous_format

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        """On the model's device, in its dtype and (for images and feature maps) its memory layout."""
        tensor = tensor.to(self.device, self.dtype)
        return tensor.contiguous(memory_format=self.memory_format) if tensor.dim() == 4 else tensor

    @property
    def input_side(self) -> int:
        """The shorter side the processor resizes to: decoding smaller than this would lose detail."""
        return processor_input_side(self.processor)

    def preprocess(self, images: list) -> np.ndarray:
        """The model's own preprocessing (resize, crop, normalise), as a float32 array (N, 3, H, W)."""
        return processor_pixels(self.processor, images)

    @torch.inference_mode()
    def embed_pixels(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """Forward pass; returns float32 vectors (N, dim) on the CPU."""
        tensor = torch.as_tensor(pixels)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        else:
            tensor = tensor.to(self.device)
        features = self.rule.extract(self.model, self.place(tensor))
        return features.float().cpu().numpy()


def processor_pixels(processor: Any, images: list) -> np.ndarray:
    """A Hugging Face image processor's output as a float32 array (N, 3, H, W)."""
    # "pt" is the one tensor type every processor returns (timm's wrapper refuses "np")
    return processor(images=images, return_tensors="pt")["pixel_values"].float().numpy()


def processor_input_side(processor: Any) -> int:
    size = getattr(processor, "size", None)
    if size is not None:
        for key in ("shortest_edge", "height", "width"):
            value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
            if value:
                return int(value)
    data_config = getattr(processor, "data_config", None)  # timm wrapper
    if isinstance(data_config, dict) and "input_size" in data_config:
        return int(data_config["input_size"][-1] / data_config.get("crop_pct", 1.0))
    return 224


def preferred_memory_format(model: Any, device: torch.device) -> torch.memory_format:
    """Channels-last for convolutional networks on the CPU: oneDNN's depthwise and pointwise convolutions
    run about twice as fast in that layout (bench/RESULTS.md, EfficientNet-Lite0); transformers keep theirs."""
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    return torch.channels_last if device.type == "cpu" and convs > 2 else torch.contiguous_format


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.isdir(path)


@dataclass(frozen=True)
class ModelKind:
    """One way a registered model's path is loaded; the first kind whose `claims(path)` holds loads it."""

    name: str
    claims: Callable[[str], bool]
    load: Callable[..., "Embedder"]  # (name, path, expected_dim, device) -> Embedder


def load_embedder(name: str, path: str, expected_dim: int | None = None, device: str | None = None) -> Embedder:
    """Load a registered model: the first of MODEL_KINDS that claims its path (a hub id or a local folder)."""
    kind = next(k for k in MODEL_KINDS if k.claims(path))
    return kind.load(name, path, expected_dim, device)


def load_pretrained(name: str, path: str, expected_dim: int | None = None, device: str | None = None) -> Embedder:
    """A Hugging Face model (hub id or local folder) with AutoModel/AutoImageProcessor.

    The probe pass checks the vector size against `expected_dim` (the registered --dim).
    """
    from transformers import AutoImageProcessor, AutoModel

    _quiet_transformers()
    if _looks_local(path) and not os.path.isdir(os.path.expanduser(path)):
        raise HeadmasterError(f"model '{name}': folder not found: {path}")
    chosen = pick_device(device)
    dtype = pick_dtype(chosen)
    try:
        model = AutoModel.from_pretrained(os.path.expanduser(path), dtype=dtype)
        # the PIL backend: the reference arithmetic, which the ONNX path repeats exactly (embedding/onnx/preprocess.py)
        processor = AutoImageProcessor.from_pretrained(os.path.expanduser(path), backend="pil")
    except (OSError, ValueError, KeyError, ImportError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set: only local folders and models already in the cache load)" if offline \
            else " (not a local folder; the Hugging Face Hub could not provide it: check the id and the network)"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HeadmasterError(f"cannot load model '{name}' from '{path}'{hint}: {first}") from None
    model.eval().to(chosen)
    memory_format = preferred_memory_format(model, chosen)
    model.to(memory_format=memory_format)
    probe = torch.zeros((1, 3, *probe_size(processor)), dtype=dtype, device=chosen)
    with torch.inference_mode():
        try:
            out = model(pixel_values=probe) if not hasattr(model, "get_image_features") else None
        except Exception:
            out = None
    model._headmaster_has_pooler = isinstance(getattr(out, "pooler_output", None), torch.Tensor)
    rule = next(r for r in FEATURE_RULES if r.applies(model))
    with torch.inference_mode():
        try:
            dim = int(rule.extract(model, probe).shape[-1])
        except Exception as e:
            raise HeadmasterError(f"model '{name}' does not produce image embeddings: {type(e).__name__}: {e}") \
                from None
    if expected_dim is not None and dim != expected_dim:
        raise HeadmasterError(
            f"model '{name}' produces {dim}-dimensional vectors but was registered with --dim {expected_dim}; "
            f"remove it and add it again with --dim {dim}")
    return Embedder(name, path, model, processor, rule, chosen, dtype, dim, memory_format)


MODEL_KINDS: tuple[ModelKind, ...] = (
    # a folder `hm finetune` wrote: its base model (loaded by load_embedder) with the LoRA adapters merged in
    ModelKind("adapted", adapted.is_adapter_folder,
              lambda name, path, dim, device: adapted.load_adapted(name, path, dim, device, load_embedder)),
    ModelKind("pretrained", lambda path: True, load_pretrained),  # transformers' from_pretrained
)


def probe_size(processor: Any) -> tuple[int, int]:
    crop = getattr(processor, "crop_size", None)
    if crop is not None:
        h = crop.get("height") if isinstance(crop, dict) else getattr(crop, "height", None)
        w = crop.get("width") if isinstance(crop, dict) else getattr(crop, "width", None)
        if h and w:
            return int(h), int(w)
    data_config = getattr(processor, "data_config", None)
    if isinstance(data_config, dict) and "input_size" in data_config:
        return int(data_config["input_size"][1]), int(data_config["input_size"][2])
    side = processor_input_side(processor)
    return side, side


_CACHE: dict[tuple[str, str, str | None], Embedder] = {}
_CACHE_LOCK = threading.Lock()


def get_embedder(name: str, path: str, expected_dim: int | None = None, device: str | None = None) -> Embedder:
    """load_embedder, kept per process: the daemon and repeated library calls load a model once."""
    key = (name, path, device)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load_embedder(name, path, expected_dim, device)
        return _CACHE[key]
