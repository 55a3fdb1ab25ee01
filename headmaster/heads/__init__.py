"""The heads wing: vectors -> decisions.

base.py        what every head kind shares: settings, input rule, split, weights, metrics, the checkpoint dict
mlp.py         the seed's MLP; linear.py, one linear layer (from the prototypes); prototypes.py, cosine similarity
checkpoint.py  checkpoint files: saved atomically, read with weights_only=True, rebuilt as a head (HEAD_KINDS)
checkpoint_meta.py  what a checkpoint says about itself, read without torch (hmd's supervisor)
checkpoint_files.py exporting and cleaning checkpoint files (hm export, hm clean)
arrays.py      scoring with numpy alone, and the uncertain rules every decision follows
folds.py       out-of-fold machinery: repeated stratified splits, each kind fitted and scored (hm evaluate uses it)
selection.py   --kind auto: the kinds compared out of fold, the winner trained; cuts.py, the --max-error cut
training.py    hm train: a head's labelled images embedded and a head trained on them
sorting.py     hm classify: decisions for files, and placing copies or moves into bucket folders
output.py      rows out: an aligned table, CSV or JSON; status.py, what hm status shows
export.py      hm export --format onnx: backbone and heads as one ONNX graph
demo/          hm demo: the main job in miniature, on sample photos that ship in the package

It reads vectors from the embedding wing and never judges itself: evaluation and curation sit above.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the module of this wing that defines it; imported on first use, so importing the wing costs nothing
_EXPORTS = {
    "BINARY_MARGIN": "arrays",
    "CheckpointCache": "checkpoint_meta",
    "Decision": "sorting",
    "ErrorCut": "cuts",
    "FORMATS": "output",
    "HEAD_KINDS": "checkpoint",
    "HeadMLP": "mlp",
    "Interval": "folds",
    "KINDS": "folds",
    "LinearHead": "linear",
    "MULTICLASS_MIN_CONFIDENCE": "arrays",
    "MultiPrediction": "sorting",
    "SplitRun": "folds",
    "TRAINERS": "folds",
    "TrainConfig": "base",
    "TrainReport": "training",
    "TrainedHead": "base",
    "UNCERTAIN": "arrays",
    "auto_suggestion": "checkpoint_meta",
    "binary_metrics": "base",
    "choose_cut": "cuts",
    "class_weights": "base",
    "clopper_pearson_upper": "cuts",
    "compare_kinds": "selection",
    "classify_folder": "sorting",
    "decide_paths": "sorting",
    "describe_goal": "checkpoint_meta",
    "describe_selection": "checkpoint_meta",
    "embed_heads": "training",
    "export_onnx": "export",
    "fit_kind": "folds",
    "fit_logreg": "folds",
    "head_fields": "checkpoint_meta",
    "head_from_checkpoint": "checkpoint",
    "labelled_rows": "training",
    "lay_out": "demo",
    "load_head": "checkpoint",
    "load_trained": "sorting",
    "multiclass_metrics": "base",
    "one_thread": "folds",
    "predict_heads": "sorting",
    "prediction_rows": "sorting",
    "prepare_inputs": "base",
    "read_checkpoint": "checkpoint",
    "read_checkpoint_meta": "checkpoint_meta",
    "repeated_splits": "folds",
    "run_demo": "demo",
    "save_checkpoint": "checkpoint",
    "source_images": "sorting",
    "stratified_split": "base",
    "t_quantile_975": "folds",
    "train_head": "mlp",
    "train_linear": "linear",
    "train_one": "training",
    "train_prototypes": "prototypes",
    "train_vectors": "selection",
    "training_split": "base",
    "write_rows": "output",
    "write_text_atomic": "output",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from headmaster.heads.arrays import BINARY_MARGIN, MULTICLASS_MIN_CONFIDENCE, UNCERTAIN
    from headmaster.heads.base import (TrainConfig, TrainedHead, binary_metrics, class_weights, multiclass_metrics,
                                       prepare_inputs, stratified_split, training_split)
    from headmaster.heads.checkpoint import HEAD_KINDS, head_from_checkpoint, load_head, read_checkpoint, save_checkpoint
    from headmaster.heads.checkpoint_meta import (CheckpointCache, auto_suggestion, describe_goal, describe_selection,
                                                 head_fields, read_checkpoint_meta)
    from headmaster.heads.cuts import ErrorCut, choose_cut, clopper_pearson_upper
    from headmaster.heads.demo import lay_out, run_demo
    from headmaster.heads.export import export_onnx
    from headmaster.heads.folds import (KINDS, TRAINERS, Interval, SplitRun, fit_kind, fit_logreg, one_thread,
                                        repeated_splits, t_quantile_975)
    from headmaster.heads.linear import LinearHead, train_linear
    from headmaster.heads.mlp import HeadMLP, train_head
    from headmaster.heads.output import FORMATS, write_rows, write_text_atomic
    from headmaster.heads.prototypes import train_prototypes
    from headmaster.heads.selection import compare_kinds, train_vectors
    from headmaster.heads.sorting import (Decision, MultiPrediction, classify_folder, decide_paths, load_trained,
                                          predict_heads, prediction_rows, source_images)
    from headmaster.heads.training import TrainReport, embed_heads, labelled_rows, train_one


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
