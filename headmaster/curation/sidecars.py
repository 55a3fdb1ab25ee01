"""Sidecar files (seed 003): the prediction written beside each image instead of a copy.

`photo.jpg` gets `photo.txt` (the tags, comma separated, as caption files are: a
binary head's name when its positive bucket wins, a multi-class head's bucket;
heads.tags) or `photo.json` (every head's probabilities, prediction and score).
An existing sidecar is never replaced unless asked; the image itself is never touched.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from headmaster import HeadmasterError
from headmaster.embedding import Context, Skipped
from headmaster.heads import HeadRules, MultiPrediction, predict_heads, source_images, tag_for, write_text_atomic

KINDS = ("txt", "json")


@dataclass(frozen=True)
class SidecarAction:
    image: Path
    sidecar: Path
    what: str  # written, replaced, kept (exists, no --overwrite); 'would write' / 'would replace' in a dry run


@dataclass
class SidecarReport:
    heads: list[str]
    kind: str
    actions: list[SidecarAction] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    dry_run: bool = False

    def counts(self) -> dict[str, int]:
        return dict(Counter(a.what for a in self.actions))


def sidecar_paths(images: list[Path], kind: str) -> dict[Path, Path]:
    """`photo.jpg` -> `photo.<kind>`; where two images share a stem (photo.jpg, photo.png) each
    gets its full name instead (`photo.jpg.<kind>`), so no two images write one file."""
    stems = Counter((p.parent, p.stem) for p in images)
    return {p: p.with_name(f"{p.stem if stems[(p.parent, p.stem)] == 1 else p.name}.{kind}") for p in images}


def caption(pred: MultiPrediction, rules: dict[str, HeadRules], prefix: str = "") -> str:
    """The caption line: `prefix` (seed 003's -p), then each head's tag keyword once; 'uncertain' adds nothing."""
    words = [w.strip() for w in prefix.split(",") if w.strip()]
    for head, d in pred.decisions.items():
        tag = tag_for(head, rules[head], d.bucket)
        if tag is not None and tag.keyword not in words:
            words.append(tag.keyword)
    return ", ".join(words) + "\n"


def sidecar_text(pred: MultiPrediction, kind: str, model_name: str, rules: dict[str, HeadRules]) -> str:
    if kind == "txt":
        return caption(pred, rules)
    doc = {
        "image": pred.path.name,
        "sha256": pred.hash,
        "model": model_name,
        "heads": {head: {"prediction": d.bucket, "score": round(d.score, 6),
                         "probabilities": {c: round(v, 6) for c, v in d.probabilities.items()}}
                  for head, d in pred.decisions.items()},
    }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def write_sidecars(ctx: Context, heads: list[str], src: Path, kind: str, overwrite: bool = False,
                   dry_run: bool = False, tta: bool = False) -> SidecarReport:
    """Score the images directly inside `src` with `heads` and write a sidecar beside each one.

    Copies and moves nothing. An existing sidecar is kept unless `overwrite`;
    with `dry_run` nothing is written and the report says what would be.
    """
    if kind not in KINDS:
        raise HeadmasterError(f"unknown sidecar kind '{kind}' (use txt or json)")
    paths = source_images(src)
    multi = predict_heads(ctx, heads, paths, tta)
    names = sidecar_paths(paths, kind)
    report = SidecarReport(heads, kind, skipped=multi.skipped, dry_run=dry_run)
    for pred in multi.predictions:
        target = names[pred.path]
        exists = target.exists()
        if exists and not overwrite:
            report.actions.append(SidecarAction(pred.path, target, "kept"))
            continue
        what = "replaced" if exists else "written"
        if dry_run:
            report.actions.append(SidecarAction(pred.path, target, "would replace" if exists else "would write"))
            continue
        try:
            write_text_atomic(target, sidecar_text(pred, kind, multi.model.name, multi.trained), overwrite=overwrite)
        except HeadmasterError:  # appeared since we looked: keep it
            report.actions.append(SidecarAction(pred.path, target, "kept"))
            continue
        report.actions.append(SidecarAction(pred.path, target, what))
    return report
