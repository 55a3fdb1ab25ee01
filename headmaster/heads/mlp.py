"""The seed's MLP head and its training.

A head never reads images or moves files: it takes vectors and gives probabilities.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from headmaster.heads.base import (Adam, TrainConfig, TrainOutcome, assemble_checkpoint, best_f1_threshold,
                                   class_weights, training_split, unit_rows)


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

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (unit_rows(x) - self.input_mean) * math.sqrt(x.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalise(x))


def _fit(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
         n_classes: int, weights: np.ndarray, config: TrainConfig) -> HeadMLP:
    binary = n_classes == 2
    torch.manual_seed(config.seed)
    module = HeadMLP(x_train.shape[1], 1 if binary else n_classes)
    if config.init_state is not None:  # a warm start: the previous head's weights, same classes
        module.load_state_dict(config.init_state)
    module.input_mean.copy_(unit_rows(x_train).mean(dim=0))
    optimiser = Adam(list(module.parameters()), lr=config.lr)
    w = torch.as_tensor(weights)

    z_train, z_val = module.normalise(x_train), module.normalise(x_val)  # once, not per batch

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
    best_state, best_key, since_best = None, (-math.inf, -math.inf), 0
    for _ in range(config.epochs):
        module.train()
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            optimiser.zero_grad()
            loss = loss_fn(module.net(z_train[idx]), y_train[idx])
            loss.backward()
            optimiser.step()
        module.eval()
        with torch.no_grad():
            logits = module.net(z_val)
            # best validation epoch: highest accuracy, ties to the lower loss (loss alone stops too early)
            key = (accuracy(logits, y_val), -float(loss_fn(logits, y_val)))
        if key > best_key:
            best_key, since_best = key, 0
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            since_best += 1
            if config.patience is not None and since_best >= config.patience:
                break  # the best epoch is kept; more epochs rarely find a better one
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return module


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
