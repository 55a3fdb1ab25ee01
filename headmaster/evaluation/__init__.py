"""The evaluation wing: how good a head is, measured honestly.

repeated.py     repeated stratified splits over the cached vectors, kinds side by side (hm evaluate)
confusion.py    the confusion matrix on test/<head>/ (hm confusion-matrix)
calibration.py  choosing a binary threshold or a confidence cut from out-of-fold scores (hm calibrate)
comparison.py   registered models compared on one head (hm compare-models)
duplicates.py   leaks between heads/ and test/ and near-duplicate examples (hm dupes)
figures.py      the review page's stored figures; plots.py, the PNGs

It reads heads and vectors and writes reports; the only checkpoint field it changes is the one
`hm calibrate` is asked to set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from headmaster import lazy_exports

# name -> the module of this wing that defines it; imported on first use, so importing the wing costs nothing
_EXPORTS = {
    "calibrate_head": "calibration",
    "compare_models": "comparison",
    "confusion_figures": "figures",
    "confusion_matrix": "confusion",
    "dupes_rows": "duplicates",
    "evaluate_head": "repeated",
    "evaluation_figures": "figures",
    "find_near_duplicates": "duplicates",
    "format_calibration": "calibration",
    "format_comparison": "comparison",
    "format_confusion": "confusion",
    "format_evaluation": "repeated",
    "hashed_leaks": "duplicates",
    "indexed_leaks": "duplicates",
    "parse_kinds": "repeated",
    "plot_calibration": "calibration",
    "plot_confusion": "confusion",
    "plot_evaluation": "repeated",
    "read_figures": "figures",
    "save_figures": "figures",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from headmaster.evaluation.calibration import calibrate_head, format_calibration, plot_calibration
    from headmaster.evaluation.comparison import compare_models, format_comparison
    from headmaster.evaluation.confusion import confusion_matrix, format_confusion, plot_confusion
    from headmaster.evaluation.duplicates import dupes_rows, find_near_duplicates, hashed_leaks, indexed_leaks
    from headmaster.evaluation.figures import confusion_figures, evaluation_figures, read_figures, save_figures
    from headmaster.evaluation.repeated import evaluate_head, format_evaluation, parse_kinds, plot_evaluation

__getattr__ = lazy_exports(__name__, _EXPORTS)
