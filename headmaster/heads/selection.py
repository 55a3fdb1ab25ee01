"""`--kind auto`: every kind scored on the same repeated out-of-fold splits, the winner trained on all images.

The kinds (prototype, linear, mlp: simplest first) are fitted on the same stratified random splits
`hm evaluate` uses (heads/folds.py) and scored on the held-out part; the simplest kind within one
standard error of the best mean accuracy wins (the one-standard-error rule; never less than TIE), so
where a few photos make the scores noisy a simpler kind is kept. The MLP sits out while a bucket has
fewer than MLP_MIN_IMAGES: a fold would train it without a validation part (every image of a class of
one goes to training), unlike the head that is then trained on all of them, so its fold scores would
not describe that head (2 photos a class: auto picked the MLP 5 times in 10 and lost 4 points). A head with a bucket of one image cannot be split: it gets a
prototype head, the kind that needs no held-out data. The comparison goes into the checkpoint's
metadata["selection"] as plain numbers (`hm status --head` prints it). It takes vectors, never reads
images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from headmaster import HeadmasterError
from headmaster.heads.base import TrainConfig, TrainOutcome
from headmaster.heads.cuts import ErrorCut, apply_cut, choose_cut, per_image_scores
from headmaster.heads.folds import TRAINERS, Interval, SplitRun, repeated_splits

TIE = 0.005  # accuracy differences below half a point are ties
MLP_MIN_IMAGES = 3  # per bucket, for the MLP to be compared at all
REUSE_GROWTH = 1.25  # a warm retrain keeps auto's last choice until the head has grown by a quarter
TEST_SIZE = 0.2


def fold_repeats(images: int) -> int:
    """Repeats of the random split: more where a split holds few images (and fits are cheap)."""
    return 10 if images < 1000 else 5


@dataclass
class Comparison:
    chosen: str
    scores: dict[str, Interval] = field(default_factory=dict)  # kind -> out-of-fold accuracy
    runs: dict[str, list[SplitRun]] = field(default_factory=dict)
    repeats: int = 0
    reason: str = ""  # why nothing was compared, when nothing was
    images: int = 0

    def as_metadata(self) -> dict[str, Any]:
        """Plain types for metadata["selection"] (the checkpoint loads with weights_only=True)."""
        return {"chosen": self.chosen, "repeats": self.repeats, "test_size": TEST_SIZE, "reason": self.reason,
                "images": self.images,
                "scores": {k: {"mean": float(v.mean), "half_width": None if v.half_width != v.half_width
                               else float(v.half_width)} for k, v in self.scores.items()}}


def splittable(labels: np.ndarray) -> bool:
    return bool(len(labels)) and int(np.bincount(labels).min()) >= 2


def compare_kinds(classes: list[str], vectors: np.ndarray, labels: np.ndarray, config: TrainConfig = TrainConfig(),
                  kinds: tuple[str, ...] = tuple(TRAINERS), repeats: int | None = None) -> Comparison:
    """Each kind's out-of-fold accuracy on the same splits (seeds config.seed, +1, ...), and the winner."""
    labels = np.asarray(labels, dtype=np.int64)
    if not splittable(labels):
        return Comparison("prototype", reason="a bucket has a single image, so no split can hold it out")
    repeats = repeats or fold_repeats(len(labels))
    comparison = Comparison("", repeats=repeats, images=len(labels))
    if int(np.bincount(labels).min()) < MLP_MIN_IMAGES and len(kinds) > 1:
        kinds = tuple(k for k in kinds if k != "mlp")
    for kind in kinds:
        runs = repeated_splits(kind, classes, vectors, labels, repeats, TEST_SIZE, config.seed, fold_config(config))
        comparison.runs[kind] = runs
        comparison.scores[kind] = Interval.of([float((r.predicted == labels[r.test_idx]).mean()) for r in runs])
    best = max(kinds, key=lambda k: comparison.scores[k].mean)
    score = comparison.scores[best]
    tolerance = max(TIE, score.std / math.sqrt(score.n) if score.n > 1 else 0.0)
    comparison.chosen = next(k for k in kinds if comparison.scores[k].mean >= score.mean - tolerance)  # simplest
    return comparison


def fold_config(config: TrainConfig) -> TrainConfig:
    """The settings a fold's head trains with: the head's own, without a fixed threshold or warm start."""
    return TrainConfig(epochs=config.epochs, lr=config.lr, patience=config.patience)


def train_vectors(head: str, classes: list[str], vectors: np.ndarray, labels: np.ndarray,
                  sources: dict[str, list[str]], model_name: str, kind: str, config: TrainConfig = TrainConfig()
                  ) -> TrainOutcome:
    """Train one kind (or `auto`: the best out of fold) on every image; with `config.max_error`, store the cut.

    An MLP trained with a goal is compared with the cheaper kinds on the same splits (metadata["comparison"]),
    so `hm status` can say when another kind would do better. With `config.previous_selection` (hmd's warm
    retrains) auto keeps the last winner until the head has grown by a quarter.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if kind != "auto" and kind not in TRAINERS:
        raise HeadmasterError(f"unknown head kind '{kind}' (choose from {', '.join(TRAINERS)}, auto)")
    comparison, auto, reused = None, kind == "auto", None
    previous = config.previous_selection
    if auto and previous and previous.get("scores") and previous.get("chosen") in TRAINERS \
            and len(labels) < REUSE_GROWTH * int(previous.get("images") or 0):
        kind, reused = previous["chosen"], dict(previous)  # a warm retrain after a few new labels: same winner
    elif auto:
        comparison = compare_kinds(classes, vectors, labels, config)
        kind = comparison.chosen
    elif config.max_error is not None and kind == "mlp" and splittable(labels):
        comparison = compare_kinds(classes, vectors, labels, config)
    outcome = TRAINERS[kind](head, classes, vectors, labels, sources, model_name, config)
    meta = outcome.checkpoint["metadata"]
    if comparison is not None:
        meta["selection" if auto else "comparison"] = comparison.as_metadata()
    elif reused is not None:
        meta["selection"] = reused
    if config.max_error is not None:
        runs = comparison.runs.get(kind) if comparison is not None else None
        if not runs and splittable(labels):
            runs = repeated_splits(kind, classes, vectors, labels, fold_repeats(len(labels)), TEST_SIZE, config.seed,
                                   fold_config(config))
        if runs:
            seen, probs = per_image_scores(len(labels), runs)
            cut = choose_cut(outcome.checkpoint["type"], labels[seen], probs, config.max_error)  # 0.5: see per_image_scores
        else:
            cut = ErrorCut(config.max_error, "margin" if len(classes) == 2 else "min_confidence",
                           1.0 if len(classes) == 2 else 1.01, False, float("nan"), 0.0, 1.0, 0)
        apply_cut(outcome.checkpoint, cut)
    return outcome
