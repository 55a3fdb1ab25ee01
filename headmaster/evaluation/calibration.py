"""Choosing a head's decision cut from out-of-fold scores (seed 003: thresholds from precision/recall data).

Scores come from repeated stratified splits: every score is given by a head
fitted without that image (the same kind as the checkpoint, trained the same
way). Binary heads get a precision/recall table over thresholds; multi-class
heads a table of confidence cuts against the uncertain share and the accuracy
of the images that are decided. A chosen value is stored in the checkpoint
(atomically); nothing else in it changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from headmaster import HeadmasterError
from headmaster.embedding import Context
from headmaster.evaluation.repeated import head_vectors
from headmaster.heads import (BINARY_MARGIN, MULTICLASS_MIN_CONFIDENCE, binary_metrics, decidable_thresholds,
                              load_trained, read_checkpoint, repeated_splits, save_checkpoint)

THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)
SHOWN_THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)
CONFIDENCE_CUTS = np.round(np.arange(0.0, 1.0, 0.05), 2)
SHOWN_CUTS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass(frozen=True)
class ThresholdRow:
    threshold: float
    precision: float
    recall: float
    f1: float
    positive: float  # share of scores at or above the threshold
    uncertain: float  # share within BINARY_MARGIN of it, which `classify` puts into uncertain/


@dataclass(frozen=True)
class CutRow:
    cut: float
    uncertain: float  # share of images whose top probability is below the cut
    accuracy: float  # accuracy of the images that are decided (nan when none are)
    decided: int


@dataclass
class OutOfFold:
    """Pooled test-split scores: each image scored by heads that never saw it, once per split it was held out in."""

    head: str
    model: str
    kind: str
    classes: list[str]
    images: int
    repeats: int
    test_size: float
    seed: int
    labels: np.ndarray  # (M,) true class index of each pooled score
    probs: np.ndarray  # (M, n_classes)

    def measured_on(self) -> str:
        return (f"{len(self.labels)} out-of-fold scores of {self.images} images from {self.repeats} repeated "
                f"stratified random splits (test size {self.test_size:g}, seeds {self.seed}.."
                f"{self.seed + self.repeats - 1}), each from a {self.kind} head fitted without that image")


def out_of_fold(vectors: np.ndarray, labels: np.ndarray, classes: list[str], kind: str, repeats: int = 10,
                test_size: float = 0.2, seed: int = 0, head: str = "", model: str = "") -> OutOfFold:
    labels = np.asarray(labels, dtype=np.int64)
    runs = repeated_splits(kind, classes, vectors, labels, repeats, test_size, seed)
    return OutOfFold(head, model, kind, list(classes), len(labels), repeats, test_size, seed,
                     np.concatenate([labels[r.test_idx] for r in runs]), np.concatenate([r.probs for r in runs]))


def threshold_rows(y: np.ndarray, p: np.ndarray, thresholds=THRESHOLDS) -> list[ThresholdRow]:
    rows = []
    for t in thresholds:
        m = binary_metrics(y, p, float(t))
        rows.append(ThresholdRow(float(t), m["precision"], m["recall"], m["f1"], float((p >= t).mean()),
                                 float((np.abs(p - t) <= BINARY_MARGIN).mean())))
    return rows


def choose_threshold(rows: list[ThresholdRow], target_precision: float | None = None,
                     target_recall: float | None = None) -> ThresholdRow:
    """Precision target: the highest recall among thresholds that reach it. Recall target: the highest
    precision among those that reach it. Neither: the best F1. Ties go to the threshold nearest 0.5
    (as `hm train`), which leaves room for the uncertainty margin on both sides. Only thresholds that leave
    both buckets reachable past that margin are chosen (heads.decidable_thresholds); the table shows all."""
    lo, hi = decidable_thresholds(BINARY_MARGIN)
    rows = [r for r in rows if lo <= r.threshold <= hi]
    if target_precision is not None:
        ok = [r for r in rows if r.positive > 0 and r.precision >= target_precision]
        if not ok:
            best = max(rows, key=lambda r: r.precision)
            raise HeadmasterError(f"no threshold reaches precision {target_precision:g} on out-of-fold scores "
                                  f"(best {best.precision:.3f} at {best.threshold:.2f})")
        return max(ok, key=lambda r: (r.recall, r.precision, -abs(r.threshold - 0.5)))
    if target_recall is not None:
        ok = [r for r in rows if r.recall >= target_recall]
        if not ok:
            raise HeadmasterError(f"no threshold reaches recall {target_recall:g} on out-of-fold scores")
        return max(ok, key=lambda r: (r.precision, r.recall, -abs(r.threshold - 0.5)))
    return max(rows, key=lambda r: (round(r.f1, 12), -abs(r.threshold - 0.5)))


def cut_rows(y: np.ndarray, probs: np.ndarray, cuts=CONFIDENCE_CUTS) -> list[CutRow]:
    top = probs.max(axis=1)
    pred = probs.argmax(axis=1)
    rows = []
    for c in cuts:
        decided = top >= c
        n = int(decided.sum())
        acc = float((pred[decided] == y[decided]).mean()) if n else float("nan")
        rows.append(CutRow(float(c), float(1 - decided.mean()), acc, n))
    return rows


@dataclass
class Calibration:
    oof: OutOfFold
    current: float  # the checkpoint's threshold (binary) or confidence cut (multi-class) before
    rows: list = field(default_factory=list)  # ThresholdRow (binary) or CutRow (multi-class)
    chosen: ThresholdRow | CutRow | None = None
    goal: str = ""
    stored: Path | None = None

    @property
    def binary(self) -> bool:
        return len(self.oof.classes) == 2


def calibrate_head(ctx: Context, head: str, target_precision: float | None = None, target_recall: float | None = None,
                   f1: bool = False, min_confidence: float | None = None, repeats: int = 10, test_size: float = 0.2,
                   seed: int = 0) -> Calibration:
    """Out-of-fold scores for the head's kind; store a threshold (binary) or confidence cut (multi-class)
    when one is asked for. Only `threshold`, `min_confidence` and metadata["calibration"] change."""
    goals = [g for g in (target_precision is not None, target_recall is not None, f1) if g]
    if len(goals) > 1:
        raise HeadmasterError("choose one of --target-precision, --target-recall and --f1")
    trained, model = load_trained(ctx, head)
    hv = head_vectors(ctx, head, model)
    if hv.classes != trained.classes:
        raise HeadmasterError(f"head '{head}' has buckets {', '.join(hv.classes)} but its checkpoint was trained on "
                              f"{', '.join(trained.classes)}: run `hm train --head {head}` first")
    binary = trained.type == "binary"
    if binary and min_confidence is not None:
        raise HeadmasterError("--min-confidence is for multi-class heads; binary heads take a threshold")
    if not binary and goals:
        raise HeadmasterError("--target-precision, --target-recall and --f1 are for binary heads; "
                              "multi-class heads take --min-confidence")
    oof = out_of_fold(hv.vectors, hv.labels, hv.classes, trained.kind, repeats, test_size, seed, head, model.name)
    checkpoint = read_checkpoint(ctx.workspace.checkpoint_path(head))  # the .pt with its weights, to rewrite
    if binary:
        cal = Calibration(oof, trained.threshold if trained.threshold is not None else 0.5,
                          threshold_rows(oof.labels, oof.probs[:, 1]))
        if goals:
            cal.chosen = choose_threshold(cal.rows, target_precision, target_recall)
            cal.goal = (f"precision >= {target_precision:g}" if target_precision is not None else
                        f"recall >= {target_recall:g}" if target_recall is not None else "best F1")
            checkpoint["threshold"] = cal.chosen.threshold
    else:
        cal = Calibration(oof, trained.min_confidence, cut_rows(oof.labels, oof.probs))
        if min_confidence is not None:
            cal.chosen = cut_rows(oof.labels, oof.probs, [min_confidence])[0]
            cal.goal = f"minimum confidence {min_confidence:g}"
            checkpoint["min_confidence"] = float(min_confidence)
    if cal.chosen is not None:
        metadata = dict(checkpoint.get("metadata", {}))
        metadata["calibration"] = {
            "goal": cal.goal,
            "value": cal.chosen.threshold if binary else cal.chosen.cut,
            "measured_on": oof.measured_on(),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **({"precision": cal.chosen.precision, "recall": cal.chosen.recall} if binary else
               {"uncertain": cal.chosen.uncertain, "accuracy_decided": cal.chosen.accuracy}),
        }
        checkpoint["metadata"] = metadata
        cal.stored = ctx.workspace.checkpoint_path(head)
        save_checkpoint(checkpoint, cal.stored)
    return cal


def _fmt(v: float) -> str:
    return "   —" if v != v else f"{v:.3f}"  # nan: nothing decided


def _mark(value: float, chosen: float | None, current: float) -> str:
    """'*' on the chosen row, '<' on the checkpoint's current setting, else a space."""
    return "*" if chosen is not None and value == chosen else "<" if round(value, 2) == round(current, 2) else " "


def _legend(cal: Calibration, what: str, extra: str = "") -> str:
    return (f"(< the checkpoint's {what} before, {cal.current:.2f}{extra}"
            + ("; * the chosen one)" if cal.chosen is not None else ")"))


def format_calibration(cal: Calibration) -> str:
    o = cal.oof
    lines = [f"Head {o.head} ({'binary' if cal.binary else 'multiclass'} {o.kind}, model {o.model})",
             f"Measured on {o.measured_on()}.", ""]
    if cal.binary:
        lines.append(f"Positive class: {o.classes[1]}. UNCERTAIN: share within ±{BINARY_MARGIN:g} of the threshold, "
                     "which classify puts into uncertain/.")
        lines.append("  THRESHOLD  PRECISION  RECALL     F1  POSITIVE  UNCERTAIN")
        shown = {round(t, 2) for t in SHOWN_THRESHOLDS} | {round(cal.current, 2)}
        if cal.chosen is not None:
            shown.add(round(cal.chosen.threshold, 2))
        for r in cal.rows:
            if round(r.threshold, 2) not in shown:
                continue
            mark = _mark(r.threshold, cal.chosen.threshold if cal.chosen is not None else None, cal.current)
            lines.append(f"{mark} {r.threshold:>9.2f}  {r.precision:>9.3f}  {r.recall:>6.3f}  {r.f1:>5.3f}  "
                         f"{r.positive:>8.3f}  {r.uncertain:>9.3f}")
        lines.append(_legend(cal, "threshold"))
        if cal.chosen is not None:
            c = cal.chosen
            lines.append(f"Chosen threshold {c.threshold:.2f} for {cal.goal}: out-of-fold precision {c.precision:.3f}, "
                         f"recall {c.recall:.3f}, F1 {c.f1:.3f}; stored in {cal.stored}")
            if c.threshold + BINARY_MARGIN >= 1 or c.threshold - BINARY_MARGIN <= 0:
                lines.append(f"Note: within ±{BINARY_MARGIN:g} of {c.threshold:.2f} everything on one side is "
                             "uncertain; classify will rarely decide that side.")
        else:
            lines.append("Nothing stored: pass --target-precision P, --target-recall R or --f1 to store a threshold.")
    else:
        lines.append("UNCERTAIN: share of images whose top probability is below the cut; ACCURACY: of the rest.")
        lines.append("  MIN CONFIDENCE  UNCERTAIN  ACCURACY  DECIDED")
        shown = set(SHOWN_CUTS) | {round(cal.current, 2)}
        rows = [r for r in cal.rows if round(r.cut, 2) in shown]
        if cal.chosen is not None and all(r.cut != cal.chosen.cut for r in rows):
            rows = sorted(rows + [cal.chosen], key=lambda r: r.cut)
        for r in rows:
            mark = _mark(r.cut, cal.chosen.cut if cal.chosen is not None else None, cal.current)
            lines.append(f"{mark} {r.cut:>14.2f}  {r.uncertain:>9.3f}  {_fmt(r.accuracy):>8}  {r.decided:>7}")
        lines.append(_legend(cal, "cut", f"; default {MULTICLASS_MIN_CONFIDENCE:g}"))
        if cal.chosen is not None:
            c = cal.chosen
            lines.append(f"Stored minimum confidence {c.cut:.2f} in {cal.stored}: {100 * c.uncertain:.1f}% uncertain, "
                         f"accuracy of the decided {_fmt(c.accuracy)} (out-of-fold)")
        else:
            lines.append("Nothing stored: pass --min-confidence C to store a cut.")
    return "\n".join(lines)


def plot_calibration(cal: Calibration, path: Path) -> Path:
    from headmaster.evaluation.plots import confidence_plot, precision_recall_plot

    o = cal.oof
    title = f"head {o.head} ({o.kind}, {o.model}): {len(o.labels)} out-of-fold scores, {o.repeats} splits"
    if cal.binary:
        chosen = (cal.chosen.recall, cal.chosen.precision) if cal.chosen is not None else None
        return precision_recall_plot([r.recall for r in cal.rows], [r.precision for r in cal.rows], chosen, path,
                                     "Precision/recall, " + title)
    return confidence_plot([r.cut for r in cal.rows], [r.uncertain for r in cal.rows],
                           [r.accuracy for r in cal.rows], path, "Confidence cut, " + title)
