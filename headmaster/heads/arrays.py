"""Scoring a trained head with numpy alone: the head's rules, its weights as arrays, and a cache of them.

A checkpoint is a torch file, but scoring needs only a few small matrices. `sorting.load_array_head`
keeps a numpy copy of every checkpoint it reads (and `checkpoint.save_checkpoint` writes one) in the
user cache, keyed by the checkpoint's SHA-256, so `hm classify` with the ONNX Runtime backend never
imports torch. The arithmetic is HeadMLP's, LinearHead's and PrototypeHead's forward pass, in float32.

This module imports neither torch nor transformers, and nothing else of the heads wing.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from headmaster.fileops import write_atomic
from headmaster.workspace import cache_root

UNCERTAIN = "uncertain"
BINARY_MARGIN = 0.1  # binary: within this of the threshold is uncertain
MULTICLASS_MIN_CONFIDENCE = 0.5  # multi-class: top probability below this is uncertain


def decidable_thresholds(margin: float = BINARY_MARGIN) -> tuple[float, float]:
    """The lowest and highest binary threshold (on the 0.01 grid) that leave both buckets reachable.

    A score within `margin` of the threshold is uncertain, so a threshold of 0.95 would send every
    image scoring above 0.85 to uncertain/ and none to the positive bucket: F1 sweeps and
    calibration choose only among thresholds in this range.
    """
    return round(margin + 0.01, 2), round(1 - margin - 0.01, 2)
ARRAYS_VERSION = 1  # bump when the cached layout changes


@dataclass
class HeadRules:
    """What a checkpoint says besides its weights: classes, threshold and the uncertainty rules."""

    checkpoint: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.checkpoint.get("kind", "mlp")

    @property
    def min_confidence(self) -> float:
        """Multi-class uncertainty cut: the checkpoint's `min_confidence` (hm calibrate), else 0.5."""
        c = self.checkpoint.get("min_confidence")
        return MULTICLASS_MIN_CONFIDENCE if c is None else float(c)

    @property
    def margin(self) -> float:
        """Binary uncertainty band: the checkpoint's `margin` (hm train --max-error), else 0.1."""
        m = self.checkpoint.get("margin")
        return BINARY_MARGIN if m is None else float(m)

    @property
    def type(self) -> str:
        return self.checkpoint["type"]

    @property
    def classes(self) -> list[str]:
        return list(self.checkpoint["classes"])

    @property
    def model_name(self) -> str:
        return self.checkpoint["model"]

    @property
    def input_dim(self) -> int:
        return int(self.checkpoint["input_dim"])

    @property
    def threshold(self) -> float | None:
        t = self.checkpoint.get("threshold")
        return None if t is None else float(t)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.checkpoint.get("metadata", {}).get("metrics", {})

    def decide(self, probs: np.ndarray) -> list[tuple[str, float]]:
        """(bucket or 'uncertain', score) per row: the seed's two uncertainty rules.

        Binary: the score is the probability of classes[1], uncertain within `margin` (0.1 unless
        the checkpoint stores another) of the threshold. Multi-class: the score is the top probability, uncertain below
        `min_confidence` (0.5 unless the checkpoint stores another cut).
        """
        out: list[tuple[str, float]] = []
        for row in probs:
            if self.type == "binary":
                p, t = float(row[1]), self.threshold if self.threshold is not None else 0.5
                label = UNCERTAIN if abs(p - t) <= self.margin else self.classes[int(p >= t)]
                out.append((label, p))
            else:
                i = int(np.argmax(row))
                conf = float(row[i])
                out.append((UNCERTAIN if conf < self.min_confidence else self.classes[i], conf))
        return out

    def doubts(self, bucket: str, p_bucket: float, preferred: str) -> bool:
        """Whether scores that put `p_bucket` on an image's own bucket (and like `preferred` best) cast doubt on
        its label: another bucket is preferred, or these rules would not sort it into its own bucket (the
        binary threshold with its margin, the multi-class confidence cut)."""
        if preferred != bucket:
            return True
        if self.type == "binary" and bucket in self.classes[:2]:
            p1 = p_bucket if bucket == self.classes[1] else 1.0 - p_bucket
            t = self.threshold if self.threshold is not None else 0.5
            return abs(p1 - t) <= BINARY_MARGIN or self.classes[int(p1 >= t)] != bucket
        return p_bucket < self.min_confidence

    def predict_labels(self, probs: np.ndarray) -> np.ndarray:
        """Hard class indices (no uncertain bucket): the threshold for binary, argmax otherwise."""
        if self.type == "binary":
            t = self.threshold if self.threshold is not None else 0.5
            return (probs[:, 1] >= t).astype(int)
        return probs.argmax(axis=1)

    def guess(self, probabilities: dict[str, float]) -> str:
        """The bucket on an image's side of the cut, uncertain or not (predict_labels for one image): what the
        review page offers as its guess."""
        row = np.array([[probabilities[c] for c in self.classes]])
        return self.classes[int(self.predict_labels(row)[0])]

    def uncertain_rule(self) -> dict[str, Any]:
        """The rule as data (the ONNX export's JSON)."""
        if self.type == "binary":
            return {"rule": "binary_margin", "threshold": self.threshold if self.threshold is not None else 0.5,
                    "margin": self.margin}
        return {"rule": "min_confidence", "min_confidence": self.min_confidence}


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.where(z >= 0, 1 / (1 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1 + np.exp(-np.abs(z))))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class ArrayHead(HeadRules):
    """A head that predicts with numpy: the same probabilities as heads.TrainedHead, without torch."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def logits(self, vectors: np.ndarray) -> np.ndarray:
        x = np.asarray(vectors, dtype=np.float32).reshape(-1, self.input_dim)
        a = self.arrays
        if self.kind == "prototype":
            sims = _unit_rows(x) @ _unit_rows(a["prototypes"]).T / a["temperature"].astype(np.float32)
            return (sims[:, 1] - sims[:, 0])[:, None] if sims.shape[1] == 2 else sims
        h = (_unit_rows(x) - a["input_mean"]) * np.float32(math.sqrt(x.shape[1]))
        if self.kind == "linear":
            return h @ a["linear.weight"].T + a["linear.bias"]
        h = np.maximum(h @ a["net.0.weight"].T + a["net.0.bias"], 0)
        h = np.maximum(h @ a["net.3.weight"].T + a["net.3.bias"], 0)
        return h @ a["net.6.weight"].T + a["net.6.bias"]

    def predict_proba(self, vectors: np.ndarray) -> np.ndarray:
        """(N, n_classes) probabilities, columns in `classes` order."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.input_dim)
        if len(vectors) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        z = self.logits(vectors)
        if self.type == "binary":
            p = _sigmoid(z[:, 0]).astype(np.float32)
            return np.stack([1 - p, p], axis=1)
        return _softmax(z).astype(np.float32)


# -- the cache -----------------------------------------------------------------------------------------

def array_path(digest: str) -> Path:
    return cache_root() / "heads" / f"{digest[:32]}-v{ARRAYS_VERSION}.npz"


def array_meta(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in checkpoint.items() if k != "model_state_dict"}


def write_arrays(data: bytes, checkpoint: dict[str, Any]) -> None:
    """Store the numpy copy of a checkpoint whose file content is `data` (best effort: a cache)."""
    arrays = {k: np.asarray(v.detach().cpu().float().numpy() if hasattr(v, "detach") else v, dtype=np.float32)
              for k, v in checkpoint["model_state_dict"].items()}
    meta = json.dumps(array_meta(checkpoint), default=str)
    buffer = io.BytesIO()
    np.savez(buffer, __meta__=np.frombuffer(meta.encode(), dtype=np.uint8), **arrays)
    path = array_path(hashlib.sha256(data).hexdigest())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: f.write(buffer.getvalue()))
    except OSError:
        pass


def read_arrays(path: Path) -> ArrayHead | None:
    try:
        with np.load(path) as z:
            meta = json.loads(z["__meta__"].tobytes().decode())
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
    except (OSError, ValueError, KeyError):
        return None
    return ArrayHead(meta, arrays)
