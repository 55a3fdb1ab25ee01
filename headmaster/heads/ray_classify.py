"""`hm classify --engine ray`: bulk predictions on a Ray cluster, rows only (nothing is copied or moved).

The heads are a few small matrices, so they ride on the embedding actors: HeadScorer (numpy, arrays.py)
turns each new vector into every head's probabilities right beside the model; vectors already cached are
scored on the driver by the same object. The rows are `hm classify --heads ... --format csv`'s, with the
full path and the content hash added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from headmaster.embedding import Context, RayOptions, embed_for_ray
from headmaster.heads.arrays import ArrayHead
from headmaster.heads.sorting import MultiPrediction, MultiReport, decisions_from_probs, load_heads, prediction_rows


class HeadScorer:
    """Every head's probabilities for a batch of vectors: one (N, classes) column per head. Picklable."""

    def __init__(self, heads: list[tuple[str, ArrayHead]]):
        self.heads = heads

    def __call__(self, vectors: np.ndarray) -> dict[str, np.ndarray]:
        return {f"probs:{name}": head.predict_proba(vectors).astype(np.float32) for name, head in self.heads}


def predict_heads_ray(ctx: Context, heads: list[str], paths: list[Path], options: RayOptions | None = None
                      ) -> MultiReport:
    """predict_heads on a Ray cluster: embed what is not cached (vectors go into the cache) and score everything."""
    trained, model = load_heads(ctx, heads)
    result = embed_for_ray(ctx, model, paths, options=options, score=HeadScorer(trained))
    report = MultiReport(heads, model, skipped=result.skipped, embed=result)
    ordered = [p for p in paths if p in result.scores]
    per_head: dict[str, dict[Path, Any]] = {}
    for name, head in trained:
        probs = np.stack([result.scores[p][f"probs:{name}"] for p in ordered]) if ordered \
            else np.zeros((0, len(head.classes)), np.float32)
        per_head[name] = {d.path: d for d in decisions_from_probs(head, ordered, result.hashes, probs)}
    for p in ordered:
        report.predictions.append(MultiPrediction(p, result.hashes[p], {h: per_head[h][p] for h in heads}))
    return report


def full_prediction_rows(report: MultiReport) -> list[dict]:
    """prediction_rows, with the full path and the content hash after the image's name."""
    rows = []
    for pred, row in zip(report.predictions, prediction_rows(report)):
        rows.append({"image": row.pop("image"), "path": str(pred.path.absolute()), "hash": pred.hash, **row})
    return rows
