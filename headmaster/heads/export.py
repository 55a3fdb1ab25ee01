"""`hm export --format onnx`: the backbone and every chosen head as one ONNX graph, plus a JSON to feed it.

The graph takes a batch of preprocessed images (float32, N x 3 x H x W, any N) and returns, per head,
its probabilities (N x classes, in the JSON's class order): backbone -> the vector step the head uses
(L2 normalisation, centring, scaling: part of HeadMLP and PrototypeHead) -> the head -> sigmoid or
softmax. The JSON beside it says how to make the input (resize, crop, mean, std) and how to read the
outputs (class names, thresholds, the uncertain rules), so nothing of headmaster is needed to use it:
examples/onnx_predict.py runs it with onnxruntime, numpy and Pillow only. Imports torch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from headmaster import HeadmasterError
from headmaster.embedding import (INPUT_NAME, BackboneVectors, Context, ImageError, PreprocessSpec, cpu_session,
                                  embed_for, export_module, get_embedder, load_image, probe_pixels, spec_from_processor,
                                  vectors_for)
from headmaster.fileops import write_atomic
from headmaster.heads.arrays import ArrayHead
from headmaster.heads.checkpoint import head_from_checkpoint, read_checkpoint
from headmaster.heads.sorting import load_heads
from headmaster.store import Model

FORMAT = "headmaster-onnx-classifier"
CHECK_TOLERANCE = 1e-3  # --check: largest probability difference allowed
CHECK_IMAGES_PER_BUCKET = 3


class Probabilities(nn.Module):
    """A head's logits as probabilities in class order: [1 - p, p] for binary, a softmax otherwise."""

    def __init__(self, head: nn.Module, binary: bool):
        super().__init__()
        self.head, self.binary = head, binary

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        logits = self.head(vectors)
        if self.binary:
            p = torch.sigmoid(logits[:, :1])
            return torch.cat([1 - p, p], dim=1)
        return torch.softmax(logits, dim=1)


class Classifier(nn.Module):
    """pixels -> one probability tensor per head, from one backbone pass."""

    def __init__(self, backbone: BackboneVectors, heads: list[Probabilities]):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList(heads)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vectors = self.backbone(pixels)
        return tuple(h(vectors) for h in self.heads)


@dataclass
class HeadCheck:
    head: str
    images: int
    max_diff: float


@dataclass
class ExportReport:
    onnx_path: Path
    json_path: Path
    model: Model
    heads: list[str]
    seconds: float
    skipped_heads: list[str] = field(default_factory=list)  # trained with another model (default head list only)
    checks: list[HeadCheck] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return self.onnx_path.stat().st_size


def default_heads(ctx: Context, model: Model) -> tuple[list[str], list[str]]:
    """(heads trained with the active model, heads trained with another one): what a plain export takes."""
    ours, others = [], []
    for path in sorted(ctx.workspace.out_dir.glob("*.pt")) if ctx.workspace.out_dir.is_dir() else []:
        (ours if read_checkpoint(path)["model"] == model.name else others).append(path.stem)
    if not ours:
        raise HeadmasterError(f"no heads trained with the active model '{model.name}' in {ctx.workspace.out_dir}: "
                              f"train a head first")
    return ours, others


def head_entry(head: str, trained: ArrayHead, output: str) -> dict:
    """What a reader of the export needs to know about one head's output."""
    return {"output": output, "type": trained.type, "kind": trained.kind, "classes": trained.classes,
            "threshold": trained.threshold, "uncertain": trained.uncertain_rule(),
            "score": "probability of classes[1]" if trained.type == "binary" else "top probability"}


def describe(spec: PreprocessSpec) -> str:
    """The preprocessing in words, for people reading the JSON."""
    if spec.resize == "shortest_edge":
        text = f"resize the shorter side to {spec.size[0]} px ({spec.resample}, aspect ratio kept)"
    else:
        text = f"resize to {spec.size[0]}x{spec.size[1]} px ({spec.resample})"
    if spec.crop:
        text += f", centre crop {spec.crop[0]}x{spec.crop[1]}"
    return text + f", RGB values x {spec.scale:.8g}, then (x - mean) / std per channel, channels first"


def export_onnx(ctx: Context, dest: Path, heads: list[str] | None = None, check: bool = False,
                name: str = "classifier") -> ExportReport:
    """Write DEST/<name>.onnx and DEST/<name>.json for `heads` (default: every head trained with the active model).

    With `check`, run the file on a few images of each head and compare with headmaster's own
    probabilities; a difference above 1e-3 is a HeadmasterError (the files stay for inspection).
    """
    started = time.perf_counter()
    skipped: list[str] = []
    if heads is None:
        heads, skipped = default_heads(ctx, ctx.active_model())
    loaded, model = load_heads(ctx, heads)  # not trained / trained with another model: clear errors here
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise HeadmasterError(f"--dest {dest} exists and is not a directory")
    embedder = get_embedder(model.name, model.path, model.embed_dim, "cpu")  # float32 on the CPU: the traced graph
    try:
        spec = spec_from_processor(embedder.processor)
    except HeadmasterError as e:
        raise HeadmasterError(f"cannot export model '{model.name}': {e}") from None
    modules = []
    for head, _ in loaded:
        torch_head = head_from_checkpoint(read_checkpoint(ctx.workspace.checkpoint_path(head)))
        modules.append(Probabilities(torch_head.module, torch_head.type == "binary"))
    outputs = [f"{h}" for h in heads]
    dest.mkdir(parents=True, exist_ok=True)
    onnx_path, json_path = dest / f"{name}.onnx", dest / f"{name}.json"
    tmp = dest / f".{name}.onnx.tmp"
    try:
        export_module(Classifier(BackboneVectors(embedder), modules), torch.from_numpy(probe_pixels(spec, 2)), tmp,
                      outputs)
    except HeadmasterError as e:
        raise HeadmasterError(f"cannot export model '{model.name}': {e}") from None
    tmp.replace(onnx_path)
    h, w = spec.input_size
    meta = {
        "format": FORMAT, "format_version": 1, "headmaster_version": version("headmaster"),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": model.name, "path": model.path, "dim": model.embed_dim, "vector": embedder.rule.name},
        "input": {"name": INPUT_NAME, "shape": ["N", 3, h, w], "dtype": "float32", "layout": "NCHW, RGB"},
        "preprocess": {**spec.to_json(), "description": describe(spec)},
        "heads": {head: head_entry(head, trained, out) for (head, trained), out in zip(loaded, outputs)},
    }
    write_atomic(json_path, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    report = ExportReport(onnx_path, json_path, model, list(heads), 0.0, skipped)
    if check:
        report.checks = check_export(ctx, report, spec, loaded, model)
    report.seconds = time.perf_counter() - started
    return report


def check_images(ctx: Context, head: str, per_bucket: int = CHECK_IMAGES_PER_BUCKET) -> list[Path]:
    """A few labelled images of the head: the first of each bucket."""
    images = ctx.workspace.head(head).labelled_images()
    out, taken = [], {}
    for path, bucket in images:
        if taken.get(bucket, 0) < per_bucket:
            taken[bucket] = taken.get(bucket, 0) + 1
            out.append(path)
    return out


def check_export(ctx: Context, report: ExportReport, spec: PreprocessSpec, loaded: list[tuple[str, ArrayHead]],
                 model: Model) -> list[HeadCheck]:
    """Run the exported file on images of every head and compare with headmaster's probabilities."""
    session = cpu_session(report.onnx_path)
    checks = []
    for index, (head, trained) in enumerate(loaded):
        paths = check_images(ctx, head)
        result = embed_for(ctx, model, paths, f"Checking {head}")
        vectors = vectors_for(ctx.store, model, result.hashes)
        pixels, rows = [], []
        for p in (p for p in paths if p in vectors):
            try:
                pixels.append(spec.apply_one(load_image(p, min_side=spec.input_side)))
            except ImageError:
                continue
            rows.append(vectors[p])
        if not pixels:
            raise HeadmasterError(f"--check: no readable images in heads/{head}/")
        ours = trained.predict_proba(np.stack(rows))
        exported = session.run(None, {INPUT_NAME: np.stack(pixels)})[index]
        diff = float(np.abs(exported - ours).max())
        checks.append(HeadCheck(head, len(pixels), diff))
        if diff > CHECK_TOLERANCE:
            raise HeadmasterError(f"--check: head '{head}': the exported file's probabilities differ from "
                                  f"headmaster's by {diff:.2e} (allowed {CHECK_TOLERANCE:.0e}) on {len(pixels)} images")
    return checks

