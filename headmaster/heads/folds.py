"""Out-of-fold machinery: repeated stratified splits over a head's vectors, each kind fitted on one part
and scoring the other, and the 95% interval over the repeats.

`hm evaluate` (evaluation/repeated.py) reports these numbers; `hm train --kind auto` and `--max-error`
(heads/selection.py, heads/cuts.py) choose from them. It lives here, in the heads wing, because training
needs it and a lower wing never imports a higher one. It takes vectors, never reads images.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from headmaster import HeadmasterError
from headmaster.heads.base import TrainConfig, class_weights, prepare_inputs, stratified_split
from headmaster.heads.checkpoint import head_from_checkpoint
from headmaster.heads.linear import train_linear
from headmaster.heads.mlp import train_head
from headmaster.heads.prototypes import train_prototypes

KINDS = ("mlp", "prototype", "logreg")  # what hm evaluate compares
# the kinds hm train can make, simplest first (ties in --kind auto go to the earlier one)
TRAINERS = {"prototype": train_prototypes, "linear": train_linear, "mlp": train_head}

# Two-sided 95% Student's t quantiles (0.975) for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t: a table to 30 df, then the Cornish-Fisher expansion (error < 1e-3)."""
    if df < 1:
        return math.nan
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


@dataclass(frozen=True)
class Interval:
    """Mean of n repeat values with its 95% confidence half-width (Student's t, n-1 df)."""

    mean: float
    half_width: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float] | np.ndarray) -> "Interval":
        v = np.asarray(values, dtype=np.float64)
        if len(v) == 0:
            return cls(math.nan, math.nan, math.nan, 0)
        if len(v) == 1:
            return cls(float(v[0]), math.nan, math.nan, 1)
        std = float(v.std(ddof=1))  # Bessel's correction, as seed 004
        return cls(float(v.mean()), t_quantile_975(len(v) - 1) * std / math.sqrt(len(v)), std, len(v))

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def __str__(self) -> str:
        hw = "n/a" if math.isnan(self.half_width) else f"{self.half_width:.3f}"
        return f"{self.mean:.3f} ± {hw}"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Small heads train ~20x faster on one thread than with torch's pool fighting other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- the three kinds: fit on train vectors, give (probabilities, predicted labels) for test vectors --

Scorer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def fit_logreg(vectors: np.ndarray, labels: np.ndarray, n_classes: int, c: float = 1.0,
               max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on `prepare_inputs` vectors (balanced class weights, L2 like C=1).

    Full-batch L-BFGS from zero weights: deterministic, no scikit-learn needed at run time.
    """
    x = prepare_inputs(vectors)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    w_class = torch.as_tensor(class_weights(np.asarray(labels), n_classes))
    weight = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    sample_w = w_class[y]

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        raw = nn.functional.cross_entropy(x @ weight.T + bias, y, reduction="none")
        loss = (raw * sample_w).sum() / len(y) + (weight ** 2).sum() / (2 * c * len(y))
        loss.backward()
        return loss

    optimiser.step(closure)
    return weight.detach(), bias.detach()


def fit_kind(kind: str, classes: list[str], vectors: np.ndarray, labels: np.ndarray, seed: int = 0,
             config: TrainConfig | None = None) -> Scorer:
    """Fit one kind of head on (vectors, labels); the scorer applies each kind's own decision rule.

    Binary: the MLP uses its F1 threshold from its inner validation split (as `hm train`),
    the prototype head and logistic regression use 0.5.
    """
    if kind in TRAINERS:
        outcome = TRAINERS[kind]("eval", classes, vectors, labels, {}, "eval", config or TrainConfig(seed=seed))
        trained = head_from_checkpoint(outcome.checkpoint)

        def score(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            probs = trained.predict_proba(x)
            return probs, trained.predict_labels(probs)

        return score
    if kind == "logreg":
        weight, bias = fit_logreg(vectors, labels, len(classes))

        def score_lr(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            with torch.no_grad():
                probs = torch.softmax(prepare_inputs(x) @ weight.T + bias, dim=1).numpy()
            return probs, probs.argmax(axis=1)

        return score_lr
    raise HeadmasterError(f"unknown kind '{kind}' (choose from {', '.join(KINDS)}, all)")


# -- repeated splits ----------------------------------------------------------------------------------

@dataclass
class SplitRun:
    """One repeat: which images were held out and what the head fitted on the rest said about them."""

    seed: int
    train_idx: np.ndarray
    test_idx: np.ndarray
    probs: np.ndarray  # (len(test_idx), n_classes)
    predicted: np.ndarray  # class indices under the kind's decision rule
    seconds: float


def repeated_splits(kind: str, classes: list[str], vectors: np.ndarray, labels: np.ndarray, repeats: int,
                    test_size: float, seed: int = 0, config: TrainConfig | None = None) -> list[SplitRun]:
    """`repeats` stratified random splits (seeds seed, seed+1, ...); fit on train, score the test part."""
    if not 0 < test_size < 1:
        raise HeadmasterError(f"test size must be between 0 and 1, got {test_size}")
    labels = np.asarray(labels, dtype=np.int64)
    runs = []
    with one_thread():
        for r in range(repeats):
            train_idx, test_idx = stratified_split(labels, test_size, seed + r)
            if len(test_idx) == 0:
                raise HeadmasterError("too few images for a test split: every class needs at least 2 images")
            t0 = time.perf_counter()
            score = fit_kind(kind, classes, vectors[train_idx], labels[train_idx], seed + r,
                             None if config is None else replace(config, seed=seed + r))
            probs, predicted = score(vectors[test_idx])
            runs.append(SplitRun(seed + r, train_idx, test_idx, probs, np.asarray(predicted),
                                 time.perf_counter() - t0))
    return runs
