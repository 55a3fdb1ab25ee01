"""Each model's backbone exported once into the user cache, checked against PyTorch, then reused.

`$XDG_CACHE_HOME/headmaster/onnx/<model>-<fingerprint>.onnx` holds the graph (pixels -> the vectors
headmaster caches) and a `.json` beside it the preprocessing rule and the outcome of the probe check:
the exported file and PyTorch must give the same vectors on a probe batch (within 1e-4 of the
largest component), else the JSON records why and the model keeps embedding with PyTorch. The
fingerprint covers the model's files (path, sizes, modification times), so a changed model is
exported anew. Finding and opening a cached export imports neither torch nor transformers; making
one does (graph.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from headmaster import HeadmasterError
from headmaster.embedding.onnx.preprocess import PreprocessSpec
from headmaster.embedding.onnx.runtime import OrtEmbedder, cpu_session
from headmaster.fileops import write_atomic
from headmaster.store import Model
from headmaster.workspace import cache_root

if TYPE_CHECKING:
    from headmaster.embedding.embedders import Embedder

EXPORT_VERSION = 1  # bump when the graph or the JSON changes: old exports are then made anew
TOLERANCE = 1e-4  # probe check: largest vector difference, relative to the largest component (at least 1)
log = logging.getLogger("headmaster.onnx")


@dataclass(frozen=True)
class BackboneExport:
    """A model's cached export, or the reason it has none."""

    onnx_path: Path
    ok: bool
    reason: str = ""
    dim: int = 0
    spec: PreprocessSpec | None = None
    max_diff: float | None = None
    seconds: float = 0.0


def _local_root(path: str) -> Path | None:
    """The folder holding the model's files: a local folder, or a hub id's snapshot in the HF cache."""
    local = Path(os.path.expanduser(path))
    if local.is_dir():
        return local.absolute()
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    repo = Path(hub) / ("models--" + path.replace("/", "--"))
    try:
        commit = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def fingerprint(model: Model) -> str | None:
    """A short hash of the model's files and the export format; None when the files are not here yet."""
    root = _local_root(model.path)
    if root is None:
        return None
    h = hashlib.sha256(f"{EXPORT_VERSION}\0{model.path}\0{root}\0{model.embed_dim}".encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            h.update(f"{os.path.relpath(full, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def export_dir() -> Path:
    return cache_root() / "onnx"


def _stem(model: Model, digest: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model.name).strip("._") or "model"
    return f"{safe}-{digest}"


def _read(json_path: Path) -> BackboneExport | None:
    try:
        data = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return None
    onnx_path = json_path.with_suffix(".onnx")
    if data.get("ok") and not onnx_path.is_file():
        return None
    spec = PreprocessSpec.from_json(data["preprocess"]) if data.get("preprocess") else None
    return BackboneExport(onnx_path, bool(data.get("ok")), data.get("reason", ""), int(data.get("dim", 0)), spec,
                          data.get("max_diff"), float(data.get("export_seconds", 0.0)))


def find_export(model: Model) -> BackboneExport | None:
    """The cached export (or recorded failure) for the model's current files; no torch import."""
    digest = fingerprint(model)
    if digest is None:
        return None
    return _read(export_dir() / f"{_stem(model, digest)}.json")


def probe_pixels(spec: PreprocessSpec, n: int, seed: int = 0) -> np.ndarray:
    """A batch of normalised-looking pixels for the probe check."""
    h, w = spec.input_size
    return np.random.default_rng(seed).normal(0, 1, size=(n, 3, h, w)).astype(np.float32)


def largest_difference(ours: np.ndarray, reference: np.ndarray) -> float:
    """Largest absolute difference relative to the reference's largest component (at least 1)."""
    scale = max(1.0, float(np.abs(reference).max(initial=0.0)))
    return float(np.abs(ours - reference).max(initial=0.0)) / scale


def export_backbone(model: Model) -> BackboneExport:
    """Export the model's backbone into the cache and check it against PyTorch (imports torch).

    A model that cannot be exported or fails the check gets a JSON saying why (so it is not tried
    again until its files change); a model that cannot be loaded at all raises HeadmasterError.
    """
    from headmaster.embedding import embedders

    key = (model.name, model.path, "cpu")
    loaded_here = key not in embedders._CACHE
    export = _export(model, embedders.get_embedder(model.name, model.path, model.embed_dim, "cpu"))
    if export.ok and loaded_here:  # ONNX Runtime embeds from now on: no second copy of the model in memory
        with embedders._CACHE_LOCK:
            embedders._CACHE.pop(key, None)
    return export


def _export(model: Model, embedder: "Embedder") -> BackboneExport:
    import torch

    from headmaster.embedding.onnx.graph import BackboneVectors, export_module
    from headmaster.embedding.onnx.preprocess import spec_from_processor

    digest = fingerprint(model)
    if digest is None:
        raise HeadmasterError(f"model '{model.name}': cannot find its files to export ({model.path})")
    folder = export_dir()
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / f"{_stem(model, digest)}.onnx"
    record: dict = {"format": "headmaster-backbone", "version": EXPORT_VERSION, "model": model.name,
                    "path": model.path, "dim": embedder.dim, "rule": embedder.rule.name,
                    "headmaster_version": version("headmaster"), "torch_version": torch.__version__}
    started = time.perf_counter()
    spec = None
    try:
        spec = spec_from_processor(embedder.processor)
        record["preprocess"] = spec.to_json()
        tmp = onnx_path.with_name(onnx_path.name + f".{os.getpid()}.tmp")
        export_module(BackboneVectors(embedder), torch.from_numpy(probe_pixels(spec, 2, seed=1)), tmp, ["vectors"])
        session = cpu_session(tmp)
        diff = 0.0
        for n in (1, 3):  # two batch sizes other than the traced one: the batch axis must really be dynamic
            pixels = probe_pixels(spec, n)
            diff = max(diff, largest_difference(session.run(None, {"pixel_values": pixels})[0],
                                                embedder.embed_pixels(pixels)))
        record["max_diff"] = diff
        if diff > TOLERANCE:
            tmp.unlink(missing_ok=True)
            raise HeadmasterError(f"the exported backbone differs from PyTorch by {diff:.1e} on the probe batch "
                                  f"(allowed {TOLERANCE:.0e})")
        os.replace(tmp, onnx_path)
        record.update(ok=True, reason="", onnx_bytes=onnx_path.stat().st_size)
    except HeadmasterError as e:
        record.update(ok=False, reason=str(e))
    except Exception as e:  # onnxruntime refusing the file, odd processors: recorded, never a crash
        record.update(ok=False, reason=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''}")
    record["export_seconds"] = round(time.perf_counter() - started, 3)
    json_path = onnx_path.with_suffix(".json")
    write_atomic(json_path, lambda f: f.write(json.dumps(record, indent=2).encode()))
    return BackboneExport(onnx_path, record["ok"], record["reason"], embedder.dim, spec, record.get("max_diff"),
                          record["export_seconds"])


_OPEN: dict[tuple[str, str, Path], OrtEmbedder] = {}
_SAID: set[tuple[str, str]] = set()
_LOCK = threading.Lock()


def backbone_embedder(model: Model, strict: bool = False) -> OrtEmbedder | None:
    """The model's ONNX Runtime embedder (exported and checked on first use), or None with one log line why.

    `strict` (backend "onnxruntime" asked for by name): a HeadmasterError instead of None.
    """
    with _LOCK:
        export = find_export(model) or export_backbone(model)
        if not export.ok:
            message = f"model '{model.name}': ONNX Runtime not used: {export.reason}"
            if strict:
                raise HeadmasterError(message + " (use --backend torch or auto)")
            if (model.name, export.reason) not in _SAID:
                _SAID.add((model.name, export.reason))
                log.warning(message + "; embedding with PyTorch")
            return None
        key = (model.name, model.path, export.onnx_path)
        if key not in _OPEN:
            assert export.spec is not None
            _OPEN[key] = OrtEmbedder.open(model.name, model.path, export.onnx_path, export.spec, export.dim)
        return _OPEN[key]
