"""An embedder that runs an exported backbone with ONNX Runtime: the pipeline's Embedder, without torch.

It offers what headmaster.embedding.pipeline uses of headmaster.embedding.embedders.Embedder (name, path, dim, device,
input_side, preprocess, embed_pixels), so decoding, batching and the core sharing stay as they are.
Preprocessing comes from the export's JSON (preprocess.py). This module imports neither torch nor
transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from headmaster.embedding.cores import cpu_cores
from headmaster.embedding.onnx.preprocess import PreprocessSpec

INPUT_NAME = "pixel_values"


@dataclass(frozen=True)
class CpuDevice:
    """Stands where a torch.device would: ONNX Runtime runs here on the CPU only."""

    type: str = "cpu"

    def __str__(self) -> str:
        return self.type


def cpu_session(path: Path, threads: int | None = None) -> Any:
    """An InferenceSession on the CPU: every core for one batch at a time, no busy-waiting between batches
    (the decode workers need those cores while the next batch is prepared)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cpu_cores()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: no warnings about unused initialisers on stderr
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@dataclass
class OrtEmbedder:
    """A backbone exported to ONNX, ready to embed; vectors equal PyTorch's to within the export check."""

    name: str
    path: str  # the registered model path (hub id or folder), as Embedder.path
    onnx_path: Path
    spec: PreprocessSpec
    dim: int
    session: Any = field(repr=False)
    device: CpuDevice = field(default_factory=CpuDevice)
    backend: str = "onnxruntime"

    @classmethod
    def open(cls, name: str, path: str, onnx_path: Path, spec: PreprocessSpec, dim: int) -> "OrtEmbedder":
        return cls(name, path, Path(onnx_path), spec, dim, cpu_session(Path(onnx_path)))

    @property
    def input_side(self) -> int:
        """The shorter side the preprocessing resizes to: decoding smaller than this would lose detail."""
        return self.spec.input_side

    def preprocess(self, images: list) -> np.ndarray:
        """The model's preprocessing (resize, crop, normalise) with Pillow and numpy: (N, 3, H, W) float32."""
        return self.spec.apply(images)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Forward pass; float32 vectors (N, dim)."""
        x = np.ascontiguousarray(np.asarray(pixels, dtype=np.float32))
        return np.asarray(self.session.run(None, {INPUT_NAME: x})[0], dtype=np.float32)
