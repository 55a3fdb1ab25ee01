"""Classifying images with a trained head and placing them into bucket folders."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from headmaster import HeadmasterError
from headmaster.embedding import Context, EmbedResult, Skipped, embed_for, vectors_for
from headmaster.fileops import copy_into, move_into, unique_path
from headmaster.heads.arrays import ArrayHead, array_meta, array_path, read_arrays, write_arrays
from headmaster.store import Model
from headmaster.workspace import list_images, shown_path

if TYPE_CHECKING:
    from headmaster.heads.base import TrainedHead

# What scores vectors: the numpy copy of a checkpoint (what commands use: no torch import needed) or the
# torch module of a freshly trained one (same probabilities, same decisions)
Scorer = Union[ArrayHead, "TrainedHead"]


def load_array_head(path: Path) -> ArrayHead:
    """The head of a checkpoint file, scored with numpy; torch is imported only when the cache lacks it."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise HeadmasterError(f"no checkpoint at {path}") from None
    except OSError as e:
        raise HeadmasterError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    cached = read_arrays(array_path(hashlib.sha256(data).hexdigest()))
    if cached is not None:
        return cached
    from headmaster.heads.checkpoint import load_head  # torch: reads and checks the checkpoint once

    trained = load_head(path)
    write_arrays(data, trained.checkpoint)
    arrays = {k: v.detach().cpu().float().numpy() for k, v in trained.checkpoint["model_state_dict"].items()}
    return ArrayHead(json.loads(json.dumps(array_meta(trained.checkpoint), default=str)), arrays)


@dataclass(frozen=True)
class Decision:
    path: Path
    hash: str
    bucket: str  # a class name, or 'uncertain'
    score: float
    probabilities: dict[str, float]


@dataclass
class ClassifyReport:
    head: str
    dest: Path
    decisions: list[Decision] = field(default_factory=list)
    placed: list[tuple[Decision, Path]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    embed: EmbedResult | None = None
    dry_run: bool = False  # placed holds planned targets; nothing was copied

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.decisions:
            out[d.bucket] = out.get(d.bucket, 0) + 1
        return out


def load_trained(ctx: Context, head: str) -> tuple[ArrayHead, Model]:
    """The head's checkpoint and the registered model it needs; errors if it cannot be used now.

    The head scores with numpy (arrays.py), so classifying needs torch only to embed."""
    trained = load_array_head(ctx.workspace.trained_checkpoint(head))
    model = ctx.active_model()
    if trained.model_name != model.name:
        raise HeadmasterError(f"head '{head}' was trained with model '{trained.model_name}' but the active model is "
                              f"'{model.name}': run `hm model-activate --name {trained.model_name}` or retrain")
    if trained.input_dim != model.embed_dim:
        raise HeadmasterError(f"head '{head}' expects {trained.input_dim}-dimensional vectors, model '{model.name}' "
                              f"gives {model.embed_dim}: retrain the head")
    return trained, model


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def embed_for_scoring(ctx: Context, model: Model, paths: list[Path], label: str = "Embedding",
                      tta: bool = False) -> tuple[dict[Path, np.ndarray], EmbedResult]:
    """The vector each readable image is scored by (cache first).

    With `tta`, the mean of the image's and its left-right mirror's unit vectors;
    mirrored vectors are cached apart (flip_embeddings), per model.
    """
    result = embed_for(ctx, model, paths, label)
    vectors = vectors_for(ctx.store, model, result.hashes)
    if tta and vectors:
        flip = embed_for(ctx, model, list(vectors), f"{label} (mirrored)", flip=True)
        mirrored = vectors_for(ctx.store, model, flip.hashes, flipped=True)
        result.skipped.extend(flip.skipped)
        vectors = {p: (_unit(v) + _unit(mirrored[p])) / 2 for p, v in vectors.items() if p in mirrored}
    return vectors, result


def score_vectors(trained: Scorer, paths: list[Path], vectors: dict[Path, np.ndarray],
                  hashes: dict[Path, str]) -> list[Decision]:
    """THE scoring step: the head's probabilities and its decision for each path that has a vector."""
    ordered = [p for p in paths if p in vectors]
    if not ordered:
        return []
    return decisions_from_probs(trained, ordered, hashes, trained.predict_proba(np.stack([vectors[p] for p in ordered])))


def decisions_from_probs(trained: Scorer, paths: list[Path], hashes: dict[Path, str], probs: np.ndarray
                         ) -> list[Decision]:
    """The head's decision for each path from its probabilities (one row per path, columns in class order)."""
    return [Decision(p, hashes[p], bucket, score, {c: float(v) for c, v in zip(trained.classes, row)})
            for p, row, (bucket, score) in zip(paths, probs, trained.decide(probs))]


def decide_paths(ctx: Context, trained: Scorer, model: Model, paths: list[Path],
                 label: str = "Embedding", tta: bool = False) -> tuple[list[Decision], EmbedResult]:
    """Embed (cache first) and decide a bucket for every readable image in `paths`."""
    vectors, result = embed_for_scoring(ctx, model, paths, label, tta)
    return score_vectors(trained, paths, vectors, result.hashes), result


def place(decision: Decision, dest_root: Path, move: bool = False) -> Path:
    """Copy (or move) the file into dest_root/<bucket>/ under a name that clashes with nothing."""
    folder = dest_root / decision.bucket
    return move_into(decision.path, folder) if move else copy_into(decision.path, folder)


def source_images(src: Path) -> list[Path]:
    """The images directly inside `src` (sorted); a missing folder is a user error."""
    src = Path(src)
    if not src.is_dir():
        raise HeadmasterError(f"source directory not found: {src}")
    return list_images(src)[0]


def classify_folder(ctx: Context, head: str, src: Path, dest: Path | None = None, move: bool = False,
                    dry_run: bool = False, tta: bool = False) -> ClassifyReport:
    """Sort the images directly inside `src` into dest (default classified/<head>/)/<bucket>/.

    Copies by default; sources are never modified. Every placement is logged in the sort log.
    With `dry_run`, `placed` holds the paths the copies would get and no file or
    folder is made, nothing is logged (only the embedding cache is filled).
    """
    paths = source_images(src)
    trained, model = load_trained(ctx, head)
    dest_root = Path(dest) if dest else ctx.workspace.classified_dir / head
    report = ClassifyReport(head, dest_root, dry_run=dry_run)
    report.decisions, report.embed = decide_paths(ctx, trained, model, paths, label=f"Classifying {head}", tta=tta)
    report.skipped = report.embed.skipped
    planned: set[Path] = set()
    for d in report.decisions:
        if dry_run:
            target = unique_path(dest_root / d.bucket, d.path.name, planned)
            planned.add(target)
        else:
            target = place(d, dest_root, move)
            ctx.store.log_sort(head, str(d.path.absolute()), str(target.absolute()), d.hash, d.bucket, d.score)
        report.placed.append((d, target))
    return report


@dataclass
class MultiPrediction:
    """One image scored by several heads from one vector."""

    path: Path
    hash: str
    decisions: dict[str, Decision]  # head -> its decision for this image


@dataclass
class MultiReport:
    heads: list[str]
    model: Model
    predictions: list[MultiPrediction] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    embed: EmbedResult | None = None
    trained: dict[str, ArrayHead] = field(default_factory=dict)  # head -> what scored it (its rules: tags.tag_for)


def load_heads(ctx: Context, heads: list[str]) -> tuple[list[tuple[str, ArrayHead]], Model]:
    """Every named head, checked against the active model (so they all share one vector per image)."""
    if not heads:
        raise HeadmasterError("no heads given")
    dupes = sorted({h for h in heads if heads.count(h) > 1})
    if dupes:
        raise HeadmasterError(f"head(s) named twice: {', '.join(dupes)}")
    loaded = [(h, *load_trained(ctx, h)) for h in heads]
    return [(h, t) for h, t, _ in loaded], loaded[0][2]


def predict_heads(ctx: Context, heads: list[str], paths: list[Path], tta: bool = False) -> MultiReport:
    """Embed each image once and score it with every head; copies and moves nothing."""
    trained, model = load_heads(ctx, heads)
    vectors, result = embed_for_scoring(ctx, model, paths, f"Classifying {', '.join(heads)}", tta)
    report = MultiReport(heads, model, skipped=result.skipped, embed=result, trained=dict(trained))
    per_head = {h: {d.path: d for d in score_vectors(t, paths, vectors, result.hashes)} for h, t in trained}
    for p in paths:
        if p in vectors:
            report.predictions.append(MultiPrediction(p, result.hashes[p], {h: per_head[h][p] for h in heads}))
    return report


def prediction_rows(report: MultiReport, root: Path | None = None) -> list[dict]:
    """One row per image: {'image': name, head: {class: probability, ..., 'prediction': bucket}} (seed 001's shape)."""
    rows = []
    for pred in report.predictions:
        shown = pred.path.name if root is None else shown_path(pred.path, root)
        row: dict = {"image": shown}
        for head, d in pred.decisions.items():
            row[head] = {**d.probabilities, "prediction": d.bucket}
        rows.append(row)
    return rows


