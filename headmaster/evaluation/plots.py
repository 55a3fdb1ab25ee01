"""PNG charts for evaluate, calibrate and confusion-matrix (matplotlib's Agg canvas: no display needed).

Figures are built with `matplotlib.figure.Figure` directly, never pyplot, so
nothing touches global state or a GUI backend, even inside the daemon.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from headmaster import HeadmasterError


def save_figure(fig: Figure, path: Path) -> Path:
    """Write the figure as PNG; a missing parent folder is a user error, not a traceback."""
    path = Path(path)
    if not path.parent.is_dir():
        raise HeadmasterError(f"cannot write {path}: folder {path.parent} does not exist")
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100)
    return path


def cumulative_accuracy_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """One line per kind: share of classes (x) against the accuracy they are at or below (y)."""
    fig = Figure(figsize=(6, 4.5), constrained_layout=True)
    ax = fig.add_subplot()
    for kind, (shares, accs) in curves.items():
        ax.step(shares, accs, where="pre", label=kind, marker="o", markersize=3)
    ax.set_xlabel("share of classes (worst first)")
    ax.set_ylabel("accuracy at or below")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def precision_recall_plot(recall: Sequence[float], precision: Sequence[float], chosen: tuple[float, float] | None,
                          path: Path, title: str) -> Path:
    fig = Figure(figsize=(5.5, 4.5), constrained_layout=True)
    ax = fig.add_subplot()
    ax.plot(recall, precision, marker=".", markersize=3)
    if chosen is not None:
        ax.plot([chosen[0]], [chosen[1]], "o", color="crimson", label="chosen threshold")
        ax.legend()
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def confidence_plot(cuts: Sequence[float], uncertain: Sequence[float], accuracy: Sequence[float], path: Path,
                    title: str) -> Path:
    fig = Figure(figsize=(5.5, 4.5), constrained_layout=True)
    ax = fig.add_subplot()
    ax.plot(cuts, uncertain, marker=".", label="uncertain share")
    ax.plot(cuts, accuracy, marker=".", label="accuracy of decided images")
    ax.set_xlabel("minimum confidence")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def confusion_plot(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    """Counts in each cell, colour by the share of the actual class (rows)."""
    matrix = np.asarray(matrix)
    side = max(4.0, 0.6 * len(classes) + 2.5)
    fig = Figure(figsize=(side, side), constrained_layout=True)
    ax = fig.add_subplot()
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                    color="white" if shares[i, j] > 0.6 else "black", fontsize=9)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
