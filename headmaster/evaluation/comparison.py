"""Which backbone suits this head: every registered model measured on the same repeated splits.

For each model the head's images are embedded where the cache lacks them
(through the pipeline, with a progress bar), the head kind is evaluated with
repeated stratified splits, and the embedding speed is timed on a small
sample (decode, preprocessing and forward pass, after one warm-up image).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from headmaster import HeadmasterError
from headmaster.embedding import Context, ImageError, Skipped, get_embedder, load_image
from headmaster.evaluation.repeated import KindResult, evaluate_vectors, head_vectors
from headmaster.store import Model

TIMING_SAMPLE = 16


@dataclass
class ModelScore:
    model: Model
    result: KindResult
    ms_per_image: float  # decode + preprocess + forward, per image, on `device`
    timed_images: int
    embedded_now: int  # images this run had to embed (not yet cached)
    images: int
    device: str

    @property
    def dim(self) -> int:
        return self.model.embed_dim


@dataclass
class Comparison:
    head: str
    kind: str
    repeats: int
    test_size: float
    seed: int
    scores: list[ModelScore] = field(default_factory=list)  # best first
    skipped: list[Skipped] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # model name -> why it could not be measured


def time_embedding(model: Model, paths: list[Path], device: str | None = None, batch_size: int | None = None,
                   sample: int = TIMING_SAMPLE) -> tuple[float, int, str]:
    """Milliseconds per image to embed up to `sample` of `paths` (nothing is cached); (ms, images, device)."""
    embedder = get_embedder(model.name, model.path, model.embed_dim, device)
    chosen = paths[: sample + 1]
    if not chosen:
        return math.nan, 0, str(embedder.device)
    try:  # warm-up: the first forward pass pays for lazy initialisation
        embedder.embed_pixels(embedder.preprocess([load_image(chosen[0], min_side=embedder.input_side)]))
    except ImageError:
        pass
    timed = chosen[1:] or chosen
    batch_size = batch_size or len(timed)
    t0 = time.perf_counter()
    count = 0
    for start in range(0, len(timed), batch_size):
        images = []
        for p in timed[start: start + batch_size]:
            try:
                images.append(load_image(p, min_side=embedder.input_side))
            except ImageError:
                continue
        if images:
            embedder.embed_pixels(embedder.preprocess(images))
            count += len(images)
    elapsed = time.perf_counter() - t0
    return (1000 * elapsed / count if count else math.nan), count, str(embedder.device)


def compare_models(ctx: Context, head: str, models: list[str] | None = None, kind: str = "mlp", repeats: int = 10,
                   test_size: float = 0.2, seed: int = 0, sample: int = TIMING_SAMPLE) -> Comparison:
    """Evaluate `kind` on the head's vectors from each model (default: every registered model), best first."""
    registered = ctx.store.models()
    if not registered:
        raise HeadmasterError("no models registered: add one with hm model-add")
    if models:
        by_name = {m.name: m for m in registered}
        unknown = [n for n in models if n not in by_name]
        if unknown:
            raise HeadmasterError(f"unknown model(s) {', '.join(unknown)} (registered: {', '.join(by_name)})")
        chosen = [by_name[n] for n in models]
    else:
        chosen = registered
    comparison = Comparison(head, kind, repeats, test_size, seed)
    o = ctx.options
    ctx.workspace.head(head)  # an unknown head is an error before any model loads
    for model in chosen:
        try:  # one model that cannot load (offline, wrong --dim) must not hide the others
            hv = head_vectors(ctx, head, model, label=f"Embedding {head} with {model.name}")
            ev = evaluate_vectors(hv.vectors, hv.labels, hv.classes, [kind], repeats, test_size, seed, head,
                                  model.name)
            ms, timed, device = time_embedding(model, hv.paths, o.device, o.batch_size, sample)
        except HeadmasterError as e:
            comparison.failed[model.name] = str(e)
            continue
        comparison.skipped.extend(s for s in hv.embed.skipped if s not in comparison.skipped)
        comparison.scores.append(ModelScore(model, ev.results[0], ms, timed, hv.embed.embedded, len(hv.labels), device))
    if not comparison.scores:
        raise HeadmasterError("no model could be measured: " + "; ".join(comparison.failed.values()))
    comparison.scores.sort(key=lambda s: (-s.result.accuracy.mean, s.ms_per_image))
    return comparison


def format_comparison(c: Comparison) -> str:
    first = c.scores[0]
    n_test = len(first.result.runs[0].test_idx) if first.result.runs else 0
    lines = [f"Head {c.head}: {c.kind} heads on each model's vectors, {first.images} images, {c.repeats} repeated "
             f"stratified random splits ({first.images - n_test} train / {n_test} test images each, test size "
             f"{c.test_size:g}, seeds {c.seed}..{c.seed + c.repeats - 1}).",
             "Accuracy is on held-out test images: mean ± 95% confidence interval (Student's t). "
             f"ms/image: decode + preprocess + forward on a sample of up to {TIMING_SAMPLE} images.", ""]
    rows = [["MODEL", "ACCURACY", "F1" if len(first.result.class_accuracy) == 2 else "MACRO F1", "MS/IMAGE", "DIM",
             "DEVICE", "EMBEDDED NOW"]]
    for s in c.scores:
        rows.append([s.model.name, str(s.result.accuracy), str(s.result.f1), f"{s.ms_per_image:.1f}", str(s.dim),
                     s.device, str(s.embedded_now)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(v.rjust(w) if 3 <= i <= 4 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
                     .rstrip())
    for name, why in c.failed.items():
        lines.append(f"Not measured: {name}: {why}")
    if len(c.scores) > 1:
        a, b = c.scores[0], c.scores[1]
        overlap = a.result.accuracy.low <= b.result.accuracy.high
        lines.append("")
        lines.append(f"Best: {a.model.name}" + (f"; its interval overlaps {b.model.name}'s, so the difference may be "
                                                 "noise (try more --repeats)" if overlap else
                                                 f", clearly ahead of {b.model.name}"))
    return "\n".join(lines)
