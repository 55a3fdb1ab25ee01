"""Which engine runs the backbone: PyTorch or ONNX Runtime (`[embedding] backend`, `--backend`).

- "torch": transformers and PyTorch, on any device.
- "onnxruntime": the model's backbone exported once to ONNX (headmaster/embedding/onnx/backbone.py), on the CPU;
  an error if the model cannot be exported.
- "auto" (default): ONNX Runtime on a CPU when the model exports cleanly and passes the probe check,
  else PyTorch with one log line saying why; PyTorch whenever a GPU is used.

Both give the same vectors (to 1e-4), which stay under the same model id in the cache, so switching
backends never re-embeds. Deciding imports no torch when the ONNX path is taken.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import TYPE_CHECKING, Any

from headmaster import HeadmasterError
from headmaster.config import BACKENDS

if TYPE_CHECKING:
    from headmaster.store import Model

DEFAULT_BACKEND = "auto"


def check_backend(name: str | None) -> str:
    if name is None:
        return DEFAULT_BACKEND
    if name not in BACKENDS:
        raise HeadmasterError(f"unknown embedding backend '{name}' (use {', '.join(BACKENDS)})")
    return name


def gpu_present() -> bool:
    """Whether the torch backend would pick a GPU, answered without importing torch when it is not loaded."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return bool(torch.cuda.is_available() or torch.backends.mps.is_available())
    if os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl"):
        return True
    return sys.platform == "darwin" and platform.machine() == "arm64"  # Apple silicon: MPS


def uses_onnx(backend: str | None, device: str | None) -> bool:
    """Whether this backend and device choice embeds with ONNX Runtime (before knowing if the model exports)."""
    backend = check_backend(backend)
    if backend == "torch":
        return False
    on_cpu = device == "cpu" if device and device != "auto" else not gpu_present()
    if backend == "onnxruntime" and not on_cpu:
        if device and device not in ("auto", "cpu"):
            raise HeadmasterError(f"the onnxruntime backend runs on the CPU only; use --backend torch for "
                                  f"--device {device}")
        return True  # asked for by name: the CPU, even with a GPU present
    return on_cpu


def device_type(backend: str | None, device: str | None) -> str:
    """"cpu", "cuda" or "mps": where the forward pass will run (decides workers and core sharing)."""
    if uses_onnx(backend, device):
        return "cpu"
    from headmaster.embedding.embedders import pick_device

    return pick_device(device).type


def backend_embedder(model: "Model", backend: str | None = None, device: str | None = None) -> Any:
    """The embedder for `model`: headmaster.embedding.onnx.runtime.OrtEmbedder or headmaster.embedding.embedders.Embedder."""
    backend = check_backend(backend)
    if uses_onnx(backend, device):
        from headmaster.embedding.onnx.backbone import backbone_embedder

        embedder = backbone_embedder(model, strict=backend == "onnxruntime")
        if embedder is not None:
            return embedder
    from headmaster.embedding.embedders import get_embedder

    return get_embedder(model.name, model.path, model.embed_dim, device)
