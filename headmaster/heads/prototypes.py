"""Prototype heads: one mean vector per class, cosine similarity, no gradient training.

A class's prototype is the mean of its images' unit vectors (after
`prepare_inputs`), so adding or removing an image or a class changes only
that class's row. Scores are cosine similarities divided by a temperature and
passed through a softmax; binary heads give one logit, (s1 - s0) / T, so the
checkpoint predicts through the same `TrainedHead` code path as the MLP.

Checkpoint layout is the seed's (type, input_dim, model, model_state_dict,
threshold for binary, classes, sources, metadata) plus `kind: "prototype"`;
`model_state_dict` holds `prototypes` (classes x input_dim) and `temperature`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from headmaster import HeadmasterError
from headmaster.heads.base import TrainConfig, TrainOutcome, assemble_checkpoint, prepare_inputs, training_split

DEFAULT_TEMPERATURE = 0.05
# Candidate temperatures for the validation fit: cosine gaps between classes range from ~0.001 (tiny random
# models) to ~0.3 (strong backbones), so the grid spans three decades.
TEMPERATURES = np.geomspace(0.0005, 1.0, 45)


class PrototypeHead(nn.Module):
    """Cosine similarity to per-class prototypes; logits like HeadMLP's (1 for binary, N otherwise)."""

    def __init__(self, prototypes: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE):
        super().__init__()
        self.register_buffer("prototypes", torch.as_tensor(prototypes, dtype=torch.float32).clone())
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))

    @classmethod
    def empty(cls, input_dim: int, n_classes: int) -> "PrototypeHead":
        """A shell to `load_state_dict` into."""
        return cls(torch.zeros(n_classes, input_dim))

    def similarities(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.normalize(x, dim=1)
        p = nn.functional.normalize(self.prototypes, dim=1)
        return x @ p.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.similarities(x) / self.temperature
        if s.shape[1] == 2:  # softmax over two classes == sigmoid of the difference
            return (s[:, 1] - s[:, 0]).unsqueeze(1)
        return s


def class_prototypes(vectors: np.ndarray, labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Mean of each class's unit vectors (as `prepare_inputs` makes them), one row per class."""
    x = prepare_inputs(vectors)
    x = nn.functional.normalize(x, dim=1)
    labels = np.asarray(labels)
    rows = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) == 0:
            raise HeadmasterError(f"class {c} has no vectors for its prototype")
        rows.append(x[torch.as_tensor(idx)].mean(dim=0))
    return torch.stack(rows)


def _probabilities(module: PrototypeHead, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        logits = module(x)
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits[:, 0]).numpy()
        return np.stack([1 - p, p], axis=1)
    return torch.softmax(logits, dim=1).numpy()


def fit_temperature(prototypes: torch.Tensor, x_val: torch.Tensor, y_val: np.ndarray) -> float:
    """The temperature with the lowest log loss on held-out vectors (argmax does not depend on it)."""
    sims = PrototypeHead(prototypes).similarities(x_val)
    y = torch.as_tensor(np.asarray(y_val, dtype=np.int64))
    best, best_loss = DEFAULT_TEMPERATURE, float("inf")
    for t in TEMPERATURES:
        loss = float(nn.functional.cross_entropy(sims / float(t), y))
        if loss < best_loss - 1e-9:
            best, best_loss = float(t), loss
    return best


def train_prototypes(head_name: str, classes: list[str], vectors: np.ndarray, labels: np.ndarray,
                     sources: dict[str, list[str]], model_name: str,
                     config: TrainConfig = TrainConfig()) -> TrainOutcome:
    """Build a prototype head and its checkpoint dictionary.

    Metrics and the softmax temperature come from the same stratified split the
    MLP uses (prototypes of the train part scored on the validation part); the
    stored prototypes are then the means over all images. Binary heads use 0.5
    (the nearer prototype wins) unless `config.threshold` is set; `hm calibrate`
    can choose a better one from out-of-fold scores.
    """
    n_classes = len(classes)
    labels = np.asarray(labels, dtype=np.int64)
    train_idx, val_idx, val_on_train = training_split(head_name, n_classes, labels, config)
    x = prepare_inputs(vectors)
    temperature = fit_temperature(class_prototypes(vectors[train_idx], labels[train_idx], n_classes),
                                  x[val_idx], labels[val_idx])
    held_out = PrototypeHead(class_prototypes(vectors[train_idx], labels[train_idx], n_classes), temperature)
    probs = _probabilities(held_out, x[val_idx])
    module = PrototypeHead(class_prototypes(vectors, labels, n_classes), temperature)
    threshold = config.threshold if n_classes == 2 else None
    checkpoint = assemble_checkpoint("prototype", head_name, classes, int(vectors.shape[1]), model_name,
                                     module.state_dict(), sources, labels[val_idx], probs, threshold,
                                     temperature=temperature)
    return TrainOutcome(checkpoint, len(train_idx), 0 if val_on_train else len(val_idx), val_on_train)
