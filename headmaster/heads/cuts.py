"""`--max-error E`: the uncertain cut that keeps the share of wrong decisions at or under E.

From out-of-fold scores (heads/folds.py: each image scored by heads fitted without it, its scores averaged
over the splits it was held out in), every candidate cut is tested: a binary head's band (lo, hi) of
uncertain scores, stored as the head's threshold (lo + hi) / 2 and margin (hi - lo) / 2 (|p - threshold|
<= margin is uncertain, as ever), a multi-class head's minimum top probability. A cut
passes when the one-sided Clopper-Pearson upper bound on the error rate of the images it decides is at
most E, each bound at 1 - 0.05 / (cuts tested) (Bonferroni), so with 95% confidence the bound holds for
the cut that is kept, not just its point estimate. Cuts that decide too few images to pass even with no
error are not tested (that depends on the scores only, never on the labels). The loosest passing cut is
kept: it decides the most images. No passing cut: the head sorts nothing.

It takes scores, never reads images; torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95  # of the Clopper-Pearson bound
EDGES = np.round(np.arange(0.0, 1.0001, 0.05), 2)  # binary: the band's ends (lo < hi) are two of these
CUTS = np.round(np.r_[np.arange(0.0, 0.951, 0.05), 0.97, 0.98, 0.99], 2)  # multi-class: minimum top probability
NOTHING_MARGIN = 1.0  # |p - threshold| <= 1 always: every image uncertain
NOTHING_CUT = 1.01  # no probability reaches it
BOUND_NAME = "one-sided Clopper-Pearson bound, 95% over all cuts tested (Bonferroni)"


def _log_binom_cdf(k: int, n: int, p: float) -> float:
    """log P(X <= k) for X ~ Binomial(n, p)."""
    if k >= n:
        return 0.0
    if p <= 0:
        return 0.0
    if p >= 1:
        return -math.inf
    i = np.arange(k + 1)
    logs = (math.lgamma(n + 1) - np.array([math.lgamma(j + 1) + math.lgamma(n - j + 1) for j in i])
            + i * math.log(p) + (n - i) * math.log1p(-p))
    top = logs.max()
    return float(top + math.log(np.exp(logs - top).sum()))


def clopper_pearson_upper(errors: int, n: int, confidence: float = CONFIDENCE) -> float:
    """The one-sided upper confidence bound on an error rate from `errors` wrong out of `n` (1.0 when n is 0)."""
    if n <= 0:
        return 1.0
    if errors >= n:
        return 1.0
    alpha, lo, hi = math.log(1 - confidence), errors / n, 1.0
    for _ in range(60):  # P(X <= errors; n, p) falls as p rises: bisect for where it reaches 1 - confidence
        mid = (lo + hi) / 2
        if _log_binom_cdf(errors, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def per_image_scores(n_images: int, runs: list) -> tuple[np.ndarray, np.ndarray]:
    """(image indices, mean out-of-fold probabilities) of every image held out at least once in `runs`."""
    total, count = None, np.zeros(n_images)
    for r in runs:
        probs = r.probs
        if total is None:
            total = np.zeros((n_images, probs.shape[1]))
        np.add.at(total, r.test_idx, probs)
        np.add.at(count, r.test_idx, 1)
    seen = np.flatnonzero(count > 0)
    if total is None:
        return seen, np.zeros((0, 0))
    return seen, total[seen] / count[seen, None]


@dataclass(frozen=True)
class ErrorCut:
    """The chosen cut and what it promises, measured on out-of-fold scores."""

    max_error: float
    rule: str  # "margin" (binary) or "min_confidence" (multi-class)
    value: float
    reached: bool  # False: no cut met the goal, the head sorts nothing
    error: float  # share of decided images that are wrong (nan when none are decided)
    coverage: float  # share of images decided
    bound: float  # the upper bound on the error of the decided images
    images: int  # images with an out-of-fold score
    threshold: float | None = None  # binary: the band's centre, the head's new threshold

    def as_metadata(self) -> dict[str, Any]:
        """Plain types, for the checkpoint's metadata["error_goal"] (weights_only=True)."""
        return {"max_error": float(self.max_error), "rule": self.rule, "value": float(self.value),
                "reached": bool(self.reached), "error": None if math.isnan(self.error) else float(self.error),
                "coverage": float(self.coverage), "bound": float(self.bound), "images": int(self.images),
                "threshold": None if self.threshold is None else float(self.threshold), "method": BOUND_NAME}


def _decided(head_type: str, probs: np.ndarray, y: np.ndarray, threshold: float, value: float
             ) -> tuple[int, int]:
    """(decided, wrong) under one cut: a band threshold +- value (binary) or a minimum confidence."""
    if head_type == "binary":
        p = probs[:, 1]
        keep = np.abs(p - threshold) > value + 1e-9
        wrong = (p[keep] >= threshold).astype(int) != y[keep]
    else:
        top = probs.max(axis=1)
        keep = top >= value
        wrong = probs[keep].argmax(axis=1) != y[keep]
    return int(keep.sum()), int(wrong.sum())


def candidates(head_type: str) -> list[tuple[float, float]]:
    """(threshold, value) of every cut: binary bands (lo, hi) as centre and half-width, else (0.5, cut)."""
    if head_type == "binary":
        return [(round((lo + hi) / 2, 3), round((hi - lo) / 2, 3)) for i, lo in enumerate(EDGES)
                for hi in EDGES[i:] if 0 < (lo + hi) / 2 < 1]
    return [(0.5, float(c)) for c in CUTS]


def choose_cut(head_type: str, labels: np.ndarray, probs: np.ndarray, max_error: float,
               confidence: float = CONFIDENCE) -> ErrorCut:
    """The cut that decides the most images while its error bound stays at or under `max_error`."""
    y = np.asarray(labels)
    n = len(y)
    rule = "margin" if head_type == "binary" else "min_confidence"
    cuts = candidates(head_type)
    counts = [(t, v, *_decided(head_type, probs, y, t, v)) for t, v in cuts]
    tested = [c for c in counts if clopper_pearson_upper(0, c[2], 1 - (1 - confidence) / len(cuts)) <= max_error]
    level = 1 - (1 - confidence) / max(len(tested), 1)  # only cuts that could pass count (scores only, not labels)
    best = None
    for t, v, decided, wrong in tested:
        bound = clopper_pearson_upper(wrong, decided, level)
        if bound <= max_error and (best is None or (decided, -abs(t - 0.5)) > (round(best.coverage * n),
                                                                                 -abs((best.threshold or 0.5) - 0.5))):
            best = ErrorCut(max_error, rule, v, True, wrong / decided, decided / n, bound, n,
                            t if head_type == "binary" else None)
    if best is not None:
        return best
    nothing = NOTHING_MARGIN if head_type == "binary" else NOTHING_CUT
    t, _, decided, wrong = min(counts, key=lambda c: (c[1], abs(c[0] - 0.5)))  # what deciding everything would do
    return ErrorCut(max_error, rule, nothing, False, wrong / decided if decided else math.nan, 0.0,
                    clopper_pearson_upper(wrong, decided, level), n)


def apply_cut(checkpoint: dict[str, Any], cut: ErrorCut) -> None:
    """Store the cut where HeadRules.decide reads it, and the goal in the metadata."""
    checkpoint["margin" if cut.rule == "margin" else "min_confidence"] = float(cut.value)
    if cut.threshold is not None:
        checkpoint["threshold"] = float(cut.threshold)
    checkpoint.setdefault("metadata", {})["error_goal"] = cut.as_metadata()
