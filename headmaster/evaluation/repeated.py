"""Repeated stratified random splits over a head's cached vectors: honest accuracy with an interval.

One 80/20 split of 60 images a class swings by points from split to split
(seed 004), so every number here is a mean over many random splits of the
held-out part, with a 95% Student's t interval over the repeats. Three kinds
of head are measured on the same splits: the seed's MLP (trained exactly like
`hm train`, inner validation split included), the prototype head, and a plain
logistic regression baseline, so users see whether the MLP earns its keep.
This module never reads images itself: vectors come from the cache through
the embedding pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headmaster import HeadmasterError
from headmaster.embedding import Context, EmbedResult, Skipped, embed_for, vectors_for
from headmaster.heads import KINDS, Interval, SplitRun, multiclass_metrics, repeated_splits
from headmaster.store import Model

# The out-of-fold machinery (the kinds, fitting, repeated splits, the interval) lives in heads/folds.py, where
# training uses it too (--kind auto, --max-error); this module summarises and reports it.


def top_k_accuracy(probs: np.ndarray, y: np.ndarray, k: int) -> float:
    top = np.argsort(-probs, axis=1)[:, :k]
    return float((top == np.asarray(y)[:, None]).any(axis=1).mean()) if len(y) else 0.0


def top_ks(n_classes: int) -> list[int]:
    """k = 3 and 5 only where they are fewer than the classes (top-k of all classes is always 1)."""
    return [k for k in (1, 3, 5) if k == 1 or k < n_classes] if n_classes > 2 else []


def cumulative_accuracy(accuracies: np.ndarray | list[float], num_intervals: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Seed 004's cumulative accuracy function: (shares, accuracies) such that the given share of
    classes (worst first) has accuracy at or below the value. A perfect head is a flat line at 1."""
    sorted_accs = np.sort(np.asarray(accuracies, dtype=np.float64))
    shares = np.linspace(0.0, 1.0, num_intervals + 1)
    per = len(sorted_accs) / num_intervals
    cum = np.zeros(num_intervals + 1)
    cum[0] = sorted_accs[0] if len(sorted_accs) else 0.0
    for i in range(1, num_intervals + 1):
        n = int(i * per)
        cum[i] = sorted_accs[max(n - 1, 0)]
    return shares, cum


@dataclass
class KindResult:
    kind: str
    runs: list[SplitRun]
    accuracy: Interval
    f1: Interval  # binary: F1 of classes[1]; multi-class: macro F1
    top_k: dict[int, Interval]
    class_accuracy: dict[str, float]  # pooled over every test split
    class_tested: dict[str, int]

    @property
    def seconds_per_fit(self) -> float:
        return float(np.mean([r.seconds for r in self.runs])) if self.runs else 0.0

    def worst_first(self) -> list[str]:
        return sorted(self.class_accuracy, key=lambda c: (self.class_accuracy[c], c))


def summarise(kind: str, classes: list[str], labels: np.ndarray, runs: list[SplitRun]) -> KindResult:
    labels = np.asarray(labels)
    accs, f1s = [], []
    tops: dict[int, list[float]] = {k: [] for k in top_ks(len(classes))}
    correct = np.zeros(len(classes))
    tested = np.zeros(len(classes))
    for run in runs:
        y = labels[run.test_idx]
        m = multiclass_metrics(y, run.predicted, classes)
        accs.append(m["accuracy"])
        per = m["per_class"]
        f1s.append(per[classes[1]]["f1"] if len(classes) == 2 else float(np.mean([v["f1"] for v in per.values()])))
        for k in tops:
            tops[k].append(top_k_accuracy(run.probs, y, k))
        np.add.at(tested, y, 1)
        np.add.at(correct, y[run.predicted == y], 1)
    class_acc = {c: float(correct[i] / tested[i]) if tested[i] else math.nan for i, c in enumerate(classes)}
    return KindResult(kind, runs, Interval.of(accs), Interval.of(f1s), {k: Interval.of(v) for k, v in tops.items()},
                      class_acc, {c: int(tested[i]) for i, c in enumerate(classes)})


@dataclass
class Evaluation:
    """Everything `hm evaluate` prints, with what it was measured on."""

    head: str
    model: str
    classes: list[str]
    counts: dict[str, int]  # images per class
    repeats: int
    test_size: float
    seed: int
    results: list[KindResult] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def head_type(self) -> str:
        return "binary" if len(self.classes) == 2 else "multiclass"

    @property
    def images(self) -> int:
        return sum(self.counts.values())

    @property
    def test_count(self) -> int:
        runs = self.results[0].runs if self.results else []
        return len(runs[0].test_idx) if runs else 0

    def best(self) -> KindResult:
        return max(self.results, key=lambda r: r.accuracy.mean)


def parse_kinds(kind: str) -> list[str]:
    if kind == "all":
        return list(KINDS)
    if kind not in KINDS:
        raise HeadmasterError(f"unknown kind '{kind}' (choose from {', '.join(KINDS)}, all)")
    return [kind]


def evaluate_vectors(vectors: np.ndarray, labels: np.ndarray, classes: list[str], kinds: list[str],
                     repeats: int = 20, test_size: float = 0.2, seed: int = 0, head: str = "", model: str = "",
                     ) -> Evaluation:
    """Repeated stratified splits for each kind, all kinds on the same splits."""
    if repeats < 2:
        raise HeadmasterError("at least 2 repeats are needed for a confidence interval")
    if len(classes) < 2:
        raise HeadmasterError(f"head '{head}' needs at least 2 classes")
    labels = np.asarray(labels, dtype=np.int64)
    counts = {c: int((labels == i).sum()) for i, c in enumerate(classes)}
    ev = Evaluation(head, model, list(classes), counts, repeats, test_size, seed)
    for kind in kinds:
        runs = repeated_splits(kind, classes, vectors, labels, repeats, test_size, seed)
        ev.results.append(summarise(kind, classes, labels, runs))
    return ev


# -- a head's vectors -----------------------------------------------------------------------------------

@dataclass
class HeadVectors:
    head: str
    model: Model
    classes: list[str]
    vectors: np.ndarray
    labels: np.ndarray
    paths: list[Path]
    embed: EmbedResult


def head_vectors(ctx: Context, head: str, model: Model | None = None, label: str | None = None) -> HeadVectors:
    """The head's labelled images as vectors of `model` (default: the active one); embeds what is missing."""
    model = model or ctx.active_model()
    labelled = ctx.workspace.head(head)
    images = labelled.labelled_images()
    result = embed_for(ctx, model, [p for p, _ in images], label or f"Embedding {head}")
    found = vectors_for(ctx.store, model, result.hashes)
    classes = labelled.classes
    if len(classes) < 2:
        raise HeadmasterError(f"head '{head}' needs at least 2 buckets, found {len(classes)}")
    usable = [(p, b) for p, b in images if p in found]
    missing = [c for c in classes if not any(b == c for _, b in usable)]
    if missing:
        raise HeadmasterError(f"head '{head}': no usable images in bucket(s) {', '.join(missing)}")
    vectors = np.stack([found[p] for p, _ in usable])
    labels = np.array([classes.index(b) for _, b in usable], dtype=np.int64)
    return HeadVectors(head, model, classes, vectors, labels, [p for p, _ in usable], result)


def evaluate_head(ctx: Context, head: str, kinds: list[str], repeats: int = 20, test_size: float = 0.2,
                  seed: int = 0) -> Evaluation:
    hv = head_vectors(ctx, head)
    ev = evaluate_vectors(hv.vectors, hv.labels, hv.classes, kinds, repeats, test_size, seed, head, hv.model.name)
    ev.skipped = hv.embed.skipped
    return ev


# -- text -------------------------------------------------------------------------------------------------

def measured_on(ev: Evaluation) -> str:
    train = ev.images - ev.test_count
    return (f"{ev.images} images, {ev.repeats} repeated stratified random splits "
            f"({train} train / {ev.test_count} test images each, test size {ev.test_size:g}, seeds {ev.seed}.."
            f"{ev.seed + ev.repeats - 1})")


def _table(rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def format_evaluation(ev: Evaluation, caf_points: int = 10) -> str:
    counts = ", ".join(f"{c} {n}" for c, n in ev.counts.items())
    lines = [f"Head {ev.head} ({ev.head_type}, {len(ev.classes)} classes: {counts}; model {ev.model})",
             f"Measured on {measured_on(ev)}.",
             f"Scores are on the held-out test images only: mean over {ev.repeats} splits "
             f"± 95% confidence interval (Student's t, {ev.repeats - 1} df).", ""]
    f1_name = "F1" if ev.head_type == "binary" else "MACRO F1"
    ks = top_ks(len(ev.classes))
    header = ["KIND", "ACCURACY", f1_name] + [f"TOP-{k}" for k in ks if k > 1] + ["FIT S"]
    rows = [header]
    for r in ev.results:
        rows.append([r.kind, str(r.accuracy), str(r.f1)] + [str(r.top_k[k]) for k in ks if k > 1]
                    + [f"{r.seconds_per_fit:.2f}"])
    lines += _table(rows)
    if ev.head_type == "binary":
        lines.append(f"(binary: mlp decides at its F1 threshold from an inner validation split, "
                     f"prototype and logreg at 0.5; F1 of '{ev.classes[1]}')")
    kinds = [r.kind for r in ev.results]
    order = ev.results[0].worst_first()
    lines += ["", f"Per-class accuracy, pooled over all {ev.repeats} test splits, worst first (by {kinds[0]}):"]
    rows = [["CLASS", *[k.upper() for k in kinds], "TESTED"]]
    for c in order:
        rows.append([c, *["—" if math.isnan(r.class_accuracy[c]) else f"{r.class_accuracy[c]:.3f}"
                          for r in ev.results], str(ev.results[0].class_tested[c])])
    lines += ["  " + s for s in _table(rows, right=set(range(1, len(kinds) + 2)))]
    untested = [c for c in order if ev.results[0].class_tested[c] == 0]
    if untested:
        lines.append(f"  (never tested: {', '.join(untested)} has a single image, which always stays in training)")
    lines += ["", "Cumulative accuracy function: the given share of classes has accuracy at or below the value:"]
    rows = [["SHARE", *[k.upper() for k in kinds]]]
    points = min(caf_points, len(ev.classes))
    curves = [cumulative_accuracy([a for a in r.class_accuracy.values() if not math.isnan(a)], points)
              for r in ev.results]
    for i, share in enumerate(curves[0][0]):
        if i == 0:
            continue
        rows.append([f"{share:.2f}", *[f"{cum[i]:.3f}" for _, cum in curves]])
    lines += ["  " + s for s in _table(rows, right=set(range(len(kinds) + 1)))]
    return "\n".join(lines)


def plot_evaluation(ev: Evaluation, path: Path) -> Path:
    """The cumulative accuracy function of every kind as a PNG."""
    from headmaster.evaluation.plots import cumulative_accuracy_plot

    points = min(10, len(ev.classes))
    curves = {r.kind: cumulative_accuracy([a for a in r.class_accuracy.values() if not math.isnan(a)], points)
              for r in ev.results}
    title = (f"Cumulative accuracy function, head {ev.head} ({ev.model})\n{ev.images} images, {ev.repeats} random "
             f"splits, {ev.test_count} test images each")
    return cumulative_accuracy_plot(curves, path, title)
