"""A head's evaluation figures as plain JSON in out/<head>.figures.json, for the review page.

`hm evaluate`, `hm confusion-matrix` and the page's "Compute" button each write their part;
the page draws them (confusion matrix as a table, cumulative accuracy as an SVG curve).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headmaster.fileops import write_atomic
from headmaster.workspace import Workspace, shown_path

if TYPE_CHECKING:
    from headmaster.evaluation.confusion import ConfusionResult
    from headmaster.evaluation.repeated import Evaluation


def figures_path(ws: Workspace, head: str) -> Path:
    return ws.out_dir / f"{head}.figures.json"


def read_figures(ws: Workspace, head: str) -> dict[str, Any] | None:
    try:
        return json.loads(figures_path(ws, head).read_text())
    except (FileNotFoundError, ValueError):
        return None


def save_figures(ws: Workspace, head: str, **parts: dict[str, Any]) -> dict[str, Any]:
    """Merge `parts` ('confusion', 'evaluate') into the head's figures file; returns the whole."""
    figures = {**(read_figures(ws, head) or {}), **parts}
    write_atomic(figures_path(ws, head), lambda f: f.write(json.dumps(figures, indent=1).encode()))
    return figures


def confusion_figures(result: "ConfusionResult", root: Path) -> dict[str, Any]:
    return {"classes": result.classes, "matrix": result.matrix.tolist(), "accuracy": result.accuracy,
            "test_dir": shown_path(result.test_dir, root) if result.test_dir else None}


def evaluation_figures(ev: "Evaluation") -> dict[str, Any]:
    """Per kind: accuracy with its interval, F1, per-bucket accuracy and the cumulative accuracy curve."""
    from headmaster.evaluation.repeated import cumulative_accuracy

    points = min(10, len(ev.classes))
    kinds = []
    for r in ev.results:  # the same curve `hm evaluate --plot` draws
        curve = cumulative_accuracy([a for a in r.class_accuracy.values() if not math.isnan(a)], points)
        kinds.append({"kind": r.kind, "accuracy": r.accuracy.mean, "low": r.accuracy.low, "high": r.accuracy.high,
                      "f1": r.f1.mean,
                      "class_accuracy": {c: None if math.isnan(a) else a for c, a in r.class_accuracy.items()},
                      "curve": [[float(x), float(y)] for x, y in zip(*curve)]})
    return {"repeats": ev.repeats, "test_size": ev.test_size, "images": ev.images, "model": ev.model,
            "kinds": kinds}
