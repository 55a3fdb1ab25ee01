"""Evaluating a trained head on a labelled test set: the confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headmaster import HeadmasterError
from headmaster.embedding import Context, Skipped, embed_for, vectors_for
from headmaster.heads import load_trained
from headmaster.workspace import shown_path


@dataclass
class ConfusionResult:
    head: str
    classes: list[str]
    matrix: np.ndarray  # rows: actual, columns: predicted
    items: list[tuple[Path, str, str]] = field(default_factory=list)  # (path, actual, predicted)
    skipped: list[Skipped] = field(default_factory=list)
    test_dir: Path | None = None

    @property
    def correct(self) -> int:
        return int(np.trace(self.matrix))

    @property
    def total(self) -> int:
        return int(self.matrix.sum())

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def confusion_matrix(ctx: Context, head: str, test_dir: Path | None = None) -> ConfusionResult:
    """Predict every image of the test set (test/<head>/ or `test_dir`) with the head's checkpoint."""
    trained, model = load_trained(ctx, head)
    test = ctx.workspace.test_set(head, test_dir)
    unknown = [b.name for b in test.buckets if b.name not in trained.classes]
    if unknown:
        raise HeadmasterError(f"test folder(s) {', '.join(unknown)} in {test.path} do not match the classes of "
                              f"head '{head}' ({', '.join(trained.classes)})")
    labelled = test.labelled_images()
    if not labelled:
        raise HeadmasterError(f"no test images in {test.path}")
    result = embed_for(ctx, model, [p for p, _ in labelled], f"Testing {head}")
    vectors = vectors_for(ctx.store, model, result.hashes)
    usable = [(p, b) for p, b in labelled if p in vectors]
    classes = trained.classes
    matrix = np.zeros((len(classes), len(classes)), dtype=int)
    items = []
    if usable:
        predicted = trained.predict_labels(trained.predict_proba(np.stack([vectors[p] for p, _ in usable])))
        for (p, actual), pi in zip(usable, predicted):
            matrix[classes.index(actual), int(pi)] += 1
            items.append((p, actual, classes[int(pi)]))
    return ConfusionResult(head, classes, matrix, items, result.skipped, test.path)


def format_confusion(result: ConfusionResult, extended: bool = False, root: Path | None = None) -> str:
    classes = result.classes
    row_labels = [f"Actual {c}" for c in classes]
    col_labels = [f"Pred {c}" for c in classes] + ["Total"]
    first = max(len(s) for s in row_labels)
    widths = [max(len(c), 5) for c in col_labels]
    header = " " * first + "".join(f"  {c:>{w}}" for c, w in zip(col_labels, widths))
    rule = "-" * max(len(header), 54)
    lines = [result.head, header, rule]
    for label, row in zip(row_labels, result.matrix):
        cells = [*row.tolist(), int(row.sum())]
        lines.append(f"{label:<{first}}" + "".join(f"  {v:>{w}}" for v, w in zip(cells, widths)))
    lines.append(rule)
    lines.append(f"Accuracy: {result.correct}/{result.total} ({100 * result.accuracy:.1f}%)")
    if extended:
        for actual in classes:
            for pred in classes:
                group = [p for p, a, pr in result.items if a == actual and pr == pred]
                if not group:
                    continue
                tag = "[CORRECT]" if actual == pred else "[WRONG]"
                lines.append("")
                lines.append(f"Actual {actual} / Pred {pred} ({len(group)})")
                for p in group:
                    lines.append(f"  {tag} {shown_path(p, root)}")
    return "\n".join(lines)


def plot_confusion(result: ConfusionResult, path: Path) -> Path:
    """The matrix as a PNG: counts in the cells, shaded by the share of each actual class."""
    from headmaster.evaluation.plots import confusion_plot

    where = f" in {result.test_dir.parent.name}/{result.test_dir.name}/" if result.test_dir else ""
    title = (f"Confusion matrix, head {result.head}: {result.total} test images{where}\n"
             f"accuracy {result.correct}/{result.total} ({100 * result.accuracy:.1f}%)")
    return confusion_plot(result.matrix, result.classes, path, title)
