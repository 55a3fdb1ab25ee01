"""Classifier heads: the seed's MLP, its training, checkpoints and predictions.

A head never reads images or moves files: it takes vectors and gives
probabilities. Checkpoints are plain dictionaries of tensors, strings and
numbers that load with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from headmaster.errors import HeadmasterError
from headmaster.fileops import write_atomic
from headmaster.head_arrays import (BINARY_MARGIN, MULTICLASS_MIN_CONFIDENCE, UNCERTAIN,  # noqa: F401 (re-exported)
                                    HeadRules, write_arrays)

HEAD_KINDS = ("mlp", "prototype")  # checkpoint "kind"; a checkpoint without one is an mlp


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 50
    lr: float = 1e-3
    batch_size: int = 64
    val_fraction: float = 0.2
    seed: int = 0
    threshold: float | None = None  # binary only: overrides the F1 sweep
    kind: str | None = None  # "mlp" or "prototype" (prototypes.py); None: keep the checkpoint's kind, else mlp


class HeadMLP(nn.Module):
    """input_dim -> 256 (ReLU, Dropout 0.3) -> 128 (ReLU, Dropout 0.2) -> 1 or N logits.

    It takes raw backbone vectors: forward() L2-normalises them, subtracts the
    training mean (the `input_mean` buffer, saved in the state dict) and scales
    by sqrt(input_dim), so a checkpoint needs nothing else to be used.
    """

    def __init__(self, input_dim: int, outputs: int):
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(input_dim))
        self.net = nn.Sequential(
            nn.Linear(input_dim, 256), nn.ReLU(), nn.Dropout(0.3),
            nn.Linear(256, 128), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(128, outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((unit_rows(x) - self.input_mean) * math.sqrt(x.shape[1]))


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row scaled to length 1 (an all-zero row stays zero)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def prepare_inputs(vectors: np.ndarray) -> torch.Tensor:
    """Vectors as float32, L2-normalised and scaled by sqrt(dim): unit RMS per feature.

    Backbones differ wildly in vector scale (CLIP ~10, DINOv2 ~50, CNN pools ~1).
    HeadMLP applies this itself (plus centring); other head kinds share it.
    """
    x = unit_rows(torch.as_tensor(np.asarray(vectors, dtype=np.float32)))
    return x * math.sqrt(x.shape[1])


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): each class split by `val_fraction`, a class of one goes to train."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        n_val = min(max(n_val, 1 if len(idx) > 1 else 0), len(idx) - 1)
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.array(train, dtype=int)), np.sort(np.array(val, dtype=int))


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse class frequency, normalised so a balanced set has weight 1 everywhere."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return weights.astype(np.float32)


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    pred = (p >= threshold).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": float((pred == y).mean()) if len(y) else 0.0,
            "precision": precision, "recall": recall, "f1": f1}


def multiclass_metrics(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    per_class: dict[str, dict[str, float]] = {}
    for i, name in enumerate(classes):
        tp = int(((pred == i) & (y == i)).sum())
        fp = int(((pred == i) & (y != i)).sum())
        fn = int(((pred != i) & (y == i)).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1}
    return {"accuracy": float((pred == y).mean()) if len(y) else 0.0, "per_class": per_class}


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Sweep 0.01..0.99 and keep the threshold with the best F1 (ties: the one nearest 0.5)."""
    best, best_key = 0.5, (-1.0, 0.0)
    for t in np.round(np.arange(0.01, 1.0, 0.01), 2):
        key = (round(binary_metrics(y, p, float(t))["f1"], 12), -abs(float(t) - 0.5))
        if key > best_key:
            best, best_key = float(t), key
    return best


@dataclass
class TrainedHead(HeadRules):
    """A head ready to predict, built from a checkpoint dictionary (rules and decisions: HeadRules)."""

    module: nn.Module = field(repr=False)  # HeadMLP or prototypes.PrototypeHead: same logits contract

    def predict_proba(self, vectors: np.ndarray) -> np.ndarray:
        """(N, n_classes) probabilities, columns in `classes` order."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.input_dim)
        if len(vectors) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        self.module.eval()
        with torch.inference_mode():
            logits = self.module(torch.as_tensor(vectors))
        if self.type == "binary":
            p = torch.sigmoid(logits[:, 0]).numpy()
            return np.stack([1 - p, p], axis=1)
        return torch.softmax(logits, dim=1).numpy()


def _fit(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
         n_classes: int, weights: np.ndarray, config: TrainConfig) -> HeadMLP:
    binary = n_classes == 2
    torch.manual_seed(config.seed)
    module = HeadMLP(x_train.shape[1], 1 if binary else n_classes)
    module.input_mean.copy_(unit_rows(x_train).mean(dim=0))
    optimiser = torch.optim.Adam(module.parameters(), lr=config.lr)
    w = torch.as_tensor(weights)

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if binary:
            raw = nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.float(), reduction="none")
        else:
            raw = nn.functional.cross_entropy(logits, y, reduction="none")
        sw = w[y]
        return (raw * sw).sum() / sw.sum().clamp_min(1e-12)

    def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
        pred = (logits[:, 0] >= 0).long() if binary else logits.argmax(dim=1)
        return float((pred == y).float().mean())

    generator = torch.Generator().manual_seed(config.seed)
    best_state, best_key = None, (-math.inf, -math.inf)
    for _ in range(config.epochs):
        module.train()
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            optimiser.zero_grad()
            loss = loss_fn(module(x_train[idx]), y_train[idx])
            loss.backward()
            optimiser.step()
        module.eval()
        with torch.no_grad():
            logits = module(x_val)
            # best validation epoch: highest accuracy, ties to the lower loss (loss alone stops too early)
            key = (accuracy(logits, y_val), -float(loss_fn(logits, y_val)))
        if key > best_key:
            best_key = key
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return module


@dataclass
class TrainOutcome:
    checkpoint: dict[str, Any]
    train_count: int
    val_count: int
    val_on_train: bool  # too few images for a separate validation split


def train_head(head_name: str, classes: list[str], vectors: np.ndarray, labels: np.ndarray, sources: dict[str, list[str]],
               model_name: str, config: TrainConfig = TrainConfig()) -> TrainOutcome:
    """Train the seed's MLP on (vectors, labels) and return the checkpoint dictionary.

    `labels` index into `classes` (sorted). Binary heads get the F1-optimal
    threshold from the validation split unless `config.threshold` is set.
    """
    n_classes = len(classes)
    labels = np.asarray(labels, dtype=np.int64)
    train_idx, val_idx, val_on_train = training_split(head_name, n_classes, labels, config)
    x = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
    y = torch.as_tensor(labels)
    weights = class_weights(labels[train_idx], n_classes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small MLP trains faster on one thread than on contended cores
    try:
        module = _fit(x[train_idx], y[train_idx], x[val_idx], y[val_idx], n_classes, weights, config)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        logits = module(x[val_idx])
    if n_classes == 2:
        p = torch.sigmoid(logits[:, 0]).numpy()
        val_probs = np.stack([1 - p, p], axis=1)
        threshold = config.threshold if config.threshold is not None else best_f1_threshold(labels[val_idx], p)
    else:
        val_probs, threshold = torch.softmax(logits, dim=1).numpy(), None
    checkpoint = assemble_checkpoint("mlp", head_name, classes, int(vectors.shape[1]), model_name,
                                     module.state_dict(), sources, labels[val_idx], val_probs, threshold)
    return TrainOutcome(checkpoint, len(train_idx), 0 if val_on_train else len(val_idx), val_on_train)


def training_split(head_name: str, n_classes: int, labels: np.ndarray, config: TrainConfig
                   ) -> tuple[np.ndarray, np.ndarray, bool]:
    """(train, val, val_on_train): the stratified split every head kind trains and reports on.

    With too few images for a validation part, validation falls back to the training part.
    """
    if n_classes < 2:
        raise HeadmasterError(f"head '{head_name}' needs at least 2 classes")
    train_idx, val_idx = stratified_split(labels, config.val_fraction, config.seed)
    if len(val_idx) == 0:
        return train_idx, train_idx, True
    return train_idx, val_idx, False


def assemble_checkpoint(kind: str, head_name: str, classes: list[str], input_dim: int, model_name: str,
                        state_dict: dict[str, torch.Tensor], sources: dict[str, list[str]], y_val: np.ndarray,
                        val_probs: np.ndarray, threshold: float | None, **metadata: Any) -> dict[str, Any]:
    """The seed's checkpoint dictionary (plus `kind`), with metrics measured on the validation part."""
    checkpoint: dict[str, Any] = {
        "type": "binary" if len(classes) == 2 else "multiclass",
        "kind": kind,
        "input_dim": input_dim,
        "model": model_name,
        "model_state_dict": state_dict,
    }
    if len(classes) == 2:
        checkpoint["threshold"] = float(threshold if threshold is not None else 0.5)
        metrics: dict[str, Any] = binary_metrics(y_val, val_probs[:, 1], checkpoint["threshold"])
    else:
        metrics = multiclass_metrics(y_val, val_probs.argmax(axis=1), classes)
    checkpoint["classes"] = list(classes)
    checkpoint["sources"] = {c: list(sources.get(c, [])) for c in classes}
    checkpoint["metadata"] = {
        "head": head_name,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "metrics": metrics,
        **metadata,
    }
    return checkpoint


def save_checkpoint(checkpoint: dict[str, Any], path: Path) -> None:
    """Write atomically: a temp file in the same folder, fsynced, then renamed over the old one."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    write_atomic(path, lambda f: f.write(buffer.getvalue()))
    write_arrays(buffer.getvalue(), checkpoint)  # the numpy copy torch-free scoring reads (head_arrays.py)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The raw checkpoint dictionary; never runs code from the file (weights_only=True)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise HeadmasterError(f"no checkpoint at {path}") from None
    except Exception as e:
        raise HeadmasterError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") \
            from None
    missing = [k for k in ("type", "input_dim", "model", "model_state_dict", "classes") if k not in data]
    if not isinstance(data, dict) or missing:
        raise HeadmasterError(f"{path} is not a headmaster checkpoint (missing {', '.join(missing)})")
    return data


def head_from_checkpoint(checkpoint: dict[str, Any]) -> TrainedHead:
    """Rebuild the head a checkpoint describes; `kind` picks the module (missing kind: mlp)."""
    kind = checkpoint.get("kind", "mlp")
    if kind not in HEAD_KINDS:
        raise HeadmasterError(f"unknown head kind '{kind}' in checkpoint (known: {', '.join(HEAD_KINDS)})")
    n_classes = len(checkpoint["classes"])
    if kind == "prototype":
        from headmaster.prototypes import PrototypeHead  # prototypes.py builds on this module

        module: nn.Module = PrototypeHead.empty(int(checkpoint["input_dim"]), n_classes)
    else:
        module = HeadMLP(int(checkpoint["input_dim"]), 1 if checkpoint["type"] == "binary" else n_classes)
    module.load_state_dict(checkpoint["model_state_dict"])
    module.eval()
    return TrainedHead(checkpoint, module)


def load_head(path: Path) -> TrainedHead:
    checkpoint = read_checkpoint(path)
    try:
        return head_from_checkpoint(checkpoint)
    except RuntimeError as e:  # a state dict that does not fit its declared shape
        raise HeadmasterError(f"cannot load checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
