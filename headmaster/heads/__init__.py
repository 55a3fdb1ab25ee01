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
ray_classify.py  hm classify --engine ray: the heads' numpy scoring on the Ray engine's embedding actors
output.py      rows out: an aligned table, CSV or JSON; status.py, what hm status shows
tags.py        what a decision says as a tag: a binary head's name, a multi-class head's bucket (hm tag)
export.py      hm export --format onnx: backbone and heads as one ONNX graph
demo/          hm demo: the main job in miniature, on sample photos that ship in the package

It reads vectors from the embedding wing and never judges itself: evaluation and curation sit above.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from headmaster import lazy_exports

# name -> the module of this wing that defines it; imported on first use, so importing the wing costs nothing
_EXPORTS = {
    "BINARY_MARGIN": "arrays",
    "decidable_thresholds": "arrays",
    "FILE_FORMATS": "output",
    "FORMATS": "output",
    "HEAD_KINDS": "checkpoint",
    "KINDS": "folds",
    "MULTICLASS_MIN_CONFIDENCE": "arrays",
    "TAG_ROOT": "tags",
    "TRAINERS": "folds",
    "UNCERTAIN": "arrays",
    "CheckpointCache": "checkpoint_meta",
    "Decision": "sorting",
    "ErrorCut": "cuts",
    "HeadMLP": "mlp",
    "HeadRules": "arrays",
    "HeadScorer": "ray_classify",
    "Interval": "folds",
    "LinearHead": "linear",
    "MultiPrediction": "sorting",
    "SplitRun": "folds",
    "Tag": "tags",
    "TrainConfig": "base",
    "TrainedHead": "base",
    "TrainReport": "training",
    "auto_suggestion": "checkpoint_meta",
    "binary_metrics": "base",
    "checkpoint_version": "checkpoint_meta",
    "choose_cut": "cuts",
    "class_weights": "base",
    "classify_folder": "sorting",
    "clopper_pearson_upper": "cuts",
    "compare_kinds": "selection",
    "cut_margin": "tags",
    "decide_paths": "sorting",
    "decide_with_cut": "tags",
    "decisions_from_probs": "sorting",
    "describe_goal": "checkpoint_meta",
    "describe_selection": "checkpoint_meta",
    "describe_tags": "tags",
    "embed_for_scoring": "sorting",
    "embed_heads": "training",
    "export_onnx": "export",
    "fit_kind": "folds",
    "fit_logreg": "folds",
    "full_prediction_rows": "ray_classify",
    "head_fields": "checkpoint_meta",
    "head_from_checkpoint": "checkpoint",
    "labelled_paths": "training",
    "labelled_rows": "training",
    "lay_out": "demo",
    "load_head": "checkpoint",
    "load_heads": "sorting",
    "load_trained": "sorting",
    "multiclass_metrics": "base",
    "one_thread": "folds",
    "positive_bucket": "tags",
    "predict_heads": "sorting",
    "predict_heads_ray": "ray_classify",
    "prediction_rows": "sorting",
    "prepare_inputs": "base",
    "read_checkpoint": "checkpoint",
    "read_checkpoint_meta": "checkpoint_meta",
    "repeated_splits": "folds",
    "run_demo": "demo",
    "save_checkpoint": "checkpoint",
    "score_vectors": "sorting",
    "source_images": "sorting",
    "stratified_split": "base",
    "t_quantile_975": "folds",
    "tag_for": "tags",
    "tag_part": "tags",
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
    from headmaster.heads.arrays import (BINARY_MARGIN, MULTICLASS_MIN_CONFIDENCE, UNCERTAIN, HeadRules,
                                         decidable_thresholds)
    from headmaster.heads.base import (TrainConfig, TrainedHead, binary_metrics, class_weights, multiclass_metrics,
                                       prepare_inputs, stratified_split, training_split)
    from headmaster.heads.checkpoint import (HEAD_KINDS, head_from_checkpoint, load_head, read_checkpoint,
                                             save_checkpoint)
    from headmaster.heads.checkpoint_meta import (CheckpointCache, auto_suggestion, checkpoint_version, describe_goal,
                                                  describe_selection, head_fields, read_checkpoint_meta)
    from headmaster.heads.cuts import ErrorCut, choose_cut, clopper_pearson_upper
    from headmaster.heads.demo import lay_out, run_demo
    from headmaster.heads.export import export_onnx
    from headmaster.heads.folds import (KINDS, TRAINERS, Interval, SplitRun, fit_kind, fit_logreg, one_thread,
                                        repeated_splits, t_quantile_975)
    from headmaster.heads.linear import LinearHead, train_linear
    from headmaster.heads.mlp import HeadMLP, train_head
    from headmaster.heads.output import FILE_FORMATS, FORMATS, write_rows, write_text_atomic
    from headmaster.heads.prototypes import train_prototypes
    from headmaster.heads.ray_classify import HeadScorer, full_prediction_rows, predict_heads_ray
    from headmaster.heads.selection import compare_kinds, train_vectors
    from headmaster.heads.sorting import (Decision, MultiPrediction, classify_folder, decide_paths,
                                          decisions_from_probs, embed_for_scoring, load_heads, load_trained,
                                          predict_heads, prediction_rows, score_vectors, source_images)
    from headmaster.heads.tags import (TAG_ROOT, Tag, cut_margin, decide_with_cut, describe_tags, positive_bucket,
                                       tag_for, tag_part)
    from headmaster.heads.training import TrainReport, embed_heads, labelled_paths, labelled_rows, train_one

__getattr__ = lazy_exports(__name__, _EXPORTS)
