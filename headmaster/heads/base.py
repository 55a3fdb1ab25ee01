"""What every head kind shares: the training settings, the input rule, the split, class weights, metrics,
the checkpoint dictionary, and a trained head's torch scoring.

The kinds (mlp.py, prototypes.py) build on this module and never on each other; checkpoint.py
turns their dictionaries into files and back. A head never reads images or moves files: it takes
vectors and gives probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from torch import nn

from headmaster import HeadmasterError
from headmaster.heads.arrays import BINARY_MARGIN, HeadRules, decidable_thresholds


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 50
    lr: float = 1e-3
    batch_size: int = 64
    val_fraction: float = 0.2
    seed: int = 0
    threshold: float | None = None  # binary only: overrides the F1 sweep
    kind: str | None = None  # a checkpoint kind (checkpoint.HEAD_KINDS) or "auto"; None: keep the checkpoint's, else mlp
    patience: int | None = 5  # mlp: stop after this many epochs without a better validation score (None: never)
    max_error: float | None = None  # choose the uncertain cut so at most this share of decided images is wrong
    warm_start: bool = False  # start from the previous checkpoint's weights when its kind and classes are the same
    init_state: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # those weights (training.py)
    previous_selection: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # warm auto: reused


class Adam:
    """torch.optim.Adam's update (no weight decay, no amsgrad), written out.

    torch.optim's Optimizer imports torch._dynamo, the compiler stack, on first use: seconds of start-up
    that a 20-second retrain of a small head should not pay.
    """

    def __init__(self, params: list[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps, self.t = list(params), lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, math.sqrt(1 - b2 ** self.t)
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        params, grads = [self.params[i] for i in live], [self.params[i].grad for i in live]
        m, v = [self.m[i] for i in live], [self.v[i] for i in live]
        # one kernel call per operation for all tensors (torch's foreach ops: no compiler involved)
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, grads, alpha=1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, c2)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(params, m, denom, value=-self.lr / c1)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row scaled to length 1 (an all-zero row stays zero)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def prepare_inputs(vectors: np.ndarray) -> torch.Tensor:
    """Vectors as float32, L2-normalised and scaled by sqrt(dim): unit RMS per feature.

    Backbones differ wildly in vector scale (CLIP ~10, DINOv2 ~50, CNN pools ~1).
    mlp.HeadMLP applies this itself (plus centring); other head kinds share it.
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


def best_f1_threshold(y: np.ndarray, p: np.ndarray, margin: float = BINARY_MARGIN) -> float:
    """Sweep the thresholds that leave both buckets reachable past the uncertain band (0.11..0.89 with the
    default margin of 0.1: arrays.decidable_thresholds) and keep the best F1 (ties: the one nearest 0.5)."""
    lo, hi = decidable_thresholds(margin)
    best, best_key = 0.5, (-1.0, 0.0)
    for t in np.round(np.arange(lo, hi + 0.005, 0.01), 2):
        key = (round(binary_metrics(y, p, float(t))["f1"], 12), -abs(float(t) - 0.5))
        if key > best_key:
            best, best_key = float(t), key
    return best


@dataclass
class TrainedHead(HeadRules):
    """A head ready to predict, built from a checkpoint dictionary (rules and decisions: HeadRules)."""

    module: nn.Module = field(repr=False)  # mlp.HeadMLP or prototypes.PrototypeHead: same logits contract

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


@dataclass
class TrainOutcome:
    checkpoint: dict[str, Any]
    train_count: int
    val_count: int
    val_on_train: bool  # too few images for a separate validation split


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
