"""Classifying images with a trained head and placing them into bucket folders."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headmaster.context import Context
from headmaster.errors import HeadmasterError
from headmaster.fileops import copy_into, move_into
from headmaster.heads import TrainedHead, load_head
from headmaster.pipeline import EmbedResult, Skipped, embed_paths, vectors_for
from headmaster.store import Model
from headmaster.workspace import list_images


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

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.decisions:
            out[d.bucket] = out.get(d.bucket, 0) + 1
        return out


def load_trained(ctx: Context, head: str) -> tuple[TrainedHead, Model]:
    """The head's checkpoint and the registered model it needs; errors if it cannot be used now."""
    path = ctx.workspace.checkpoint_path(head)
    if not path.exists():
        raise HeadmasterError(f"head '{head}' is not trained yet (no {path}): run `hm train --head {head}`")
    trained = load_head(path)
    model = ctx.store.active_model()
    if trained.model_name != model.name:
        raise HeadmasterError(f"head '{head}' was trained with model '{trained.model_name}' but the active model is "
                              f"'{model.name}': run `hm model-activate --name {trained.model_name}` or retrain")
    if trained.input_dim != model.embed_dim:
        raise HeadmasterError(f"head '{head}' expects {trained.input_dim}-dimensional vectors, model '{model.name}' "
                              f"gives {model.embed_dim}: retrain the head")
    return trained, model


def decide_paths(ctx: Context, trained: TrainedHead, model: Model, paths: list[Path],
                 label: str = "Embedding") -> tuple[list[Decision], EmbedResult]:
    """Embed (cache first) and decide a bucket for every readable image in `paths`."""
    o = ctx.options
    result = embed_paths(ctx.store, model, paths, device=o.device, batch_size=o.batch_size, workers=o.workers,
                         progress=o.progress, label=label)
    vectors = vectors_for(ctx.store, model, result.hashes)
    ordered = [p for p in paths if p in vectors]
    if not ordered:
        return [], result
    probs = trained.predict_proba(np.stack([vectors[p] for p in ordered]))
    decisions = []
    for p, row, (bucket, score) in zip(ordered, probs, trained.decide(probs)):
        decisions.append(Decision(p, result.hashes[p], bucket, score,
                                  {c: float(v) for c, v in zip(trained.classes, row)}))
    return decisions, result


def place(decision: Decision, dest_root: Path, move: bool = False) -> Path:
    """Copy (or move) the file into dest_root/<bucket>/ under a name that clashes with nothing."""
    folder = dest_root / decision.bucket
    return move_into(decision.path, folder) if move else copy_into(decision.path, folder)


def classify_folder(ctx: Context, head: str, src: Path, dest: Path | None = None, move: bool = False) -> ClassifyReport:
    """Sort the images directly inside `src` into dest (default classified/<head>/)/<bucket>/.

    Copies by default; sources are never modified. Every placement is logged in the sort log.
    """
    src = Path(src)
    if not src.is_dir():
        raise HeadmasterError(f"source directory not found: {src}")
    trained, model = load_trained(ctx, head)
    dest_root = Path(dest) if dest else ctx.workspace.classified_dir / head
    paths, _ = list_images(src)
    report = ClassifyReport(head, dest_root)
    report.decisions, report.embed = decide_paths(ctx, trained, model, paths, label=f"Classifying {head}")
    report.skipped = report.embed.skipped
    for d in report.decisions:
        target = place(d, dest_root, move)
        ctx.store.log_sort(head, str(d.path.absolute()), str(target.absolute()), d.hash, d.bucket, d.score)
        report.placed.append((d, target))
    return report
