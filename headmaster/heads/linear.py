"""The linear head: one linear layer on the MLP's inputs, a class-weighted logistic regression.

Inputs are normalised as HeadMLP's (unit length, minus the training mean, times sqrt(dim)), so a checkpoint
needs nothing else to be used. Training starts from the class prototypes written as a linear layer (the
prototype head is exactly such a layer) and its L2 penalty pulls the weights back towards them, not
towards zero: with a few photos a class the head stays near the prototypes, with many it is a plain
logistic regression (the penalty is a fixed prior, PRIOR / images, so the data outweigh it as they grow).
Metrics, the binary threshold and the prototypes' temperature come from the same validation split the
MLP uses; the stored layer is then refitted on every image.

Checkpoint layout: the seed's, with `kind: "linear"`; `model_state_dict` holds `input_mean`, `linear.weight`
and `linear.bias`. A head never reads images or moves files.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from headmaster.heads.base import (Adam, TrainConfig, TrainOutcome, assemble_checkpoint, best_f1_threshold,
                                   class_weights, training_split, unit_rows)
from headmaster.heads.prototypes import class_prototypes, fit_temperature

# The pull towards the prototypes, in images' worth: measured on the clothing photos (bench/head_kinds.py),
# 30 / images was within half a point of the best of 3, 30 and 300 / images at 5, 20 and 307 photos a class.
PRIOR = 30.0
STEPS = 150  # full-batch Adam steps from the prototype start
LR = 0.02


class LinearHead(nn.Module):
    """(unit(x) - input_mean) * sqrt(input_dim) -> 1 or N logits."""

    def __init__(self, input_dim: int, outputs: int):
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(input_dim))
        self.linear = nn.Linear(input_dim, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((unit_rows(x) - self.input_mean) * math.sqrt(x.shape[1]))


def prototype_layer(vectors: np.ndarray, labels: np.ndarray, n_classes: int, mean: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the prototype head as a linear layer on the normalised inputs.

    cos(x, p_c) / T = z . p_c / (T sqrt(d)) + mean . p_c / T for z = (unit(x) - mean) sqrt(d); binary heads
    keep the difference of the two rows, as PrototypeHead does.
    """
    p = nn.functional.normalize(class_prototypes(vectors, labels, n_classes), dim=1)
    d = p.shape[1]
    weight, bias = p / (temperature * math.sqrt(d)), p @ mean / temperature
    if n_classes == 2:
        return (weight[1] - weight[0]).unsqueeze(0), (bias[1] - bias[0]).unsqueeze(0)
    return weight, bias


def _fit(vectors: np.ndarray, labels: np.ndarray, n_classes: int, strength: float, temperature: float,
         lr: float = LR, steps: int = STEPS) -> LinearHead:
    """Weighted cross-entropy plus strength/2 * |W - W_prototypes|^2, full batch, from the prototype layer."""
    x = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    binary = n_classes == 2
    module = LinearHead(x.shape[1], 1 if binary else n_classes)
    mean = unit_rows(x).mean(dim=0)
    module.input_mean.copy_(mean)
    w0, b0 = prototype_layer(vectors, labels, n_classes, mean, temperature)
    with torch.no_grad():
        module.linear.weight.copy_(w0)
        module.linear.bias.copy_(b0)
    z = (unit_rows(x) - mean) * math.sqrt(x.shape[1])
    sw = torch.as_tensor(class_weights(np.asarray(labels), n_classes))[y]
    sw = sw / sw.sum()
    optimiser = Adam([module.linear.weight, module.linear.bias], lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        logits = module.linear(z)
        if binary:
            raw = nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.float(), reduction="none")
        else:
            raw = nn.functional.cross_entropy(logits, y, reduction="none")
        loss = (raw * sw).sum() + strength / 2 * ((module.linear.weight - w0) ** 2).sum()
        loss.backward()
        optimiser.step()
    module.eval()
    return module


def _probs(module: LinearHead, vectors: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = module(torch.as_tensor(np.asarray(vectors, dtype=np.float32)))
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits[:, 0]).numpy()
        return np.stack([1 - p, p], axis=1)
    return torch.softmax(logits, dim=1).numpy()


def train_linear(head_name: str, classes: list[str], vectors: np.ndarray, labels: np.ndarray,
                 sources: dict[str, list[str]], model_name: str, config: TrainConfig = TrainConfig()) -> TrainOutcome:
    """Fit the linear head and return its checkpoint dictionary.

    The prototypes' temperature and the metrics come from the stratified validation split; the stored layer
    is refitted on every image. Binary heads get the F1-optimal threshold from that
    split unless `config.threshold` is set.
    """
    n_classes = len(classes)
    labels = np.asarray(labels, dtype=np.int64)
    vectors = np.asarray(vectors, dtype=np.float32)
    train_idx, val_idx, val_on_train = training_split(head_name, n_classes, labels, config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: threads cost more than they give (9 s against 0.2 s on 2 busy cores)
    try:
        x_val = torch.as_tensor(vectors[val_idx])
        temperature = fit_temperature(class_prototypes(vectors[train_idx], labels[train_idx], n_classes),
                                      nn.functional.normalize(x_val, dim=1), labels[val_idx])
        held_out = _fit(vectors[train_idx], labels[train_idx], n_classes, PRIOR / len(train_idx), temperature)
        val_probs = _probs(held_out, vectors[val_idx])
        strength = PRIOR / len(labels)
        final = _fit(vectors, labels, n_classes, strength, temperature)
    finally:
        torch.set_num_threads(threads)
    threshold = None
    if n_classes == 2:
        threshold = config.threshold if config.threshold is not None else best_f1_threshold(labels[val_idx],
                                                                                             val_probs[:, 1])
    checkpoint = assemble_checkpoint("linear", head_name, classes, int(vectors.shape[1]), model_name,
                                     final.state_dict(), sources, labels[val_idx], val_probs, threshold,
                                     strength=float(strength), temperature=float(temperature))
    return TrainOutcome(checkpoint, len(train_idx), 0 if val_on_train else len(val_idx), val_on_train)
