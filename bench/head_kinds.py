"""Head kinds at every size: mlp, linear, prototype and auto on the clothing photos, plus --max-error and retrain time.

Lays ../shared/data/clothing out as heads/clothing/<class>/ (train) and test/clothing/<class>/ (validation)
in a work folder, embeds once with the built-in backbone (../shared/models/efficientnet-lite0) into that
workspace's cache and reuses it on later runs. Then, for N photos per class drawn from train/ (N = 1, 2, 5,
10, 20, 50 and all) with each seed, trains every kind on the drawn vectors exactly as `hm train` does
(heads.train_vectors) and scores it on validation/: mean accuracy with a 95% Student's t interval over the
seeds. For the full head it trains with --max-error 0.05 and 0.02 and reports the error and coverage on
validation/ beside the out-of-fold promise, and times `hm train --head clothing` (start-up included).

    uv run python bench/head_kinds.py [--shared ../shared] [--workdir bench/out/head_kinds] [--seeds 10]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIZES = (1, 2, 5, 10, 20, 50, 0)  # 0: every training photo
KINDS = ("mlp", "linear", "prototype", "auto")


def hm(args: list[str], workspace: Path, quiet: bool = False) -> tuple[str, float]:
    env = dict(os.environ, HEADMASTER_WORKSPACE=str(workspace), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "headmaster", *args], env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if not quiet:
        print(f"$ hm {' '.join(args)}   ({took:.1f}s, exit {proc.returncode})")
        print(proc.stdout.rstrip())
    if proc.returncode:
        print(proc.stderr.rstrip())
        sys.exit(proc.returncode)
    return proc.stdout, took


def lay_out(shared: Path, workdir: Path) -> Path:
    ws = workdir / "workspace"
    if (ws / "heads" / "clothing").is_dir():
        return ws
    for part, dst in (("train", ws / "heads" / "clothing"), ("validation", ws / "test" / "clothing")):
        for cls in sorted(p for p in (shared / "data" / "clothing" / part).iterdir() if p.is_dir()):
            (dst / cls.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir()):
                (dst / cls.name / f.name).symlink_to(f.resolve())
    return ws


def embedded(ws: Path, shared: Path) -> None:
    """Register the backbone and embed heads/ and test/ once (later runs find the cache)."""
    db = ws / "headmaster.db"
    if not db.exists():
        hm(["model-add", "--name", "lite0", "--path", str(shared / "models" / "efficientnet-lite0"), "--dim", "1280"],
           ws)
    hm(["embed"], ws)
    from headmaster.embedding import Context, embed_for

    with Context.open(ws) as ctx:
        paths = sorted(p for p in (ws / "test" / "clothing").rglob("*") if p.is_file())
        embed_for(ctx, ctx.active_model(), paths, "Embedding test/")


def load(ws: Path, folder: Path, classes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    conn = sqlite3.connect(ws / "headmaster.db")
    model_id = conn.execute("SELECT id FROM models WHERE active = 1").fetchone()[0]
    index = dict(conn.execute("SELECT path, hash FROM files"))
    vectors = {h: np.frombuffer(v, dtype="<f4") for h, v in
               conn.execute("SELECT hash, vector FROM embeddings WHERE model_id = ?", (model_id,))}
    classes = classes or sorted(p.name for p in folder.iterdir() if p.is_dir())
    x, y = [], []
    for i, cls in enumerate(classes):
        for f in sorted((folder / cls).iterdir()):
            h = index.get(str(f.absolute()))
            if h in vectors:
                x.append(vectors[h])
                y.append(i)
    return np.stack(x), np.array(y, dtype=np.int64), classes


def draw(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    if per_class == 0:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), min(per_class, int((y == c).sum())),
                                              replace=False) for c in np.unique(y)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "out" / "head_kinds")
    parser.add_argument("--workspace", type=Path, default=None, help="an embedded workspace to reuse as is")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--skip-sizes", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    ws = args.workspace or lay_out(args.shared.absolute(), args.workdir.absolute())
    if args.workspace is None:
        embedded(ws, args.shared.absolute())
    from headmaster.heads import Interval, TrainConfig, head_from_checkpoint, one_thread, train_vectors

    x, y, classes = load(ws, ws / "heads" / "clothing")
    xv, yv, _ = load(ws, ws / "test" / "clothing", classes)
    print(f"{len(y)} train / {len(yv)} validation vectors, {len(classes)} classes")
    kinds = args.kinds.split(",")

    def fit(idx: np.ndarray, kind: str, seed: int, **extra):
        t0 = time.perf_counter()
        with one_thread():
            outcome = train_vectors("clothing", classes, x[idx], y[idx], {}, "lite0", kind,
                                    TrainConfig(seed=seed, kind=kind, **extra))
        return outcome.checkpoint, time.perf_counter() - t0

    if not args.skip_sizes:
        print(f"\n| photos per class | {' | '.join(kinds)} | auto chose |")
        print("|---|" + "---|" * (len(kinds) + 1))
        for n in map(int, args.sizes.split(",")):
            accs: dict[str, list[float]] = {k: [] for k in kinds}
            chose: list[str] = []
            seconds: dict[str, float] = {k: 0.0 for k in kinds}
            for seed in range(args.seeds if n else min(args.seeds, 3)):
                idx = draw(y, n, seed)
                for kind in kinds:
                    ck, took = fit(idx, kind, seed)
                    seconds[kind] += took
                    head = head_from_checkpoint(ck)
                    accs[kind].append(float((head.predict_labels(head.predict_proba(xv)) == yv).mean()))
                    if kind == "auto":
                        chose.append(ck["kind"])
            cells = [f"{Interval.of(v).mean:.3f} ± {Interval.of(v).half_width:.3f}" for v in accs.values()]
            picks = ", ".join(f"{k} {chose.count(k)}" for k in ("prototype", "linear", "mlp") if chose.count(k))
            print(f"| {n or f'all ({len(y)})'} | {' | '.join(cells)} | {picks} |", flush=True)
            print("  fit seconds per draw: " + ", ".join(f"{k} {s / len(accs[k]):.1f}" for k, s in seconds.items()),
                  flush=True)

    print("\n| --max-error | kind | promise (out of fold) | coverage out of fold | error on validation/ | "
          "coverage on validation/ |")
    print("|---|---|---|---|---|---|")
    for goal in (0.05, 0.02):
        for kind in ("mlp", "auto"):
            ck, _ = fit(np.arange(len(y)), kind, 0, max_error=goal)
            head = head_from_checkpoint(ck)
            decided = [(b, i) for (b, _), i in zip(head.decide(head.predict_proba(xv)), yv) if b != "uncertain"]
            wrong = sum(b != classes[i] for b, i in decided)
            g = ck["metadata"]["error_goal"]
            err = f"{wrong / len(decided):.3f} ({wrong}/{len(decided)})" if decided else "—"
            print(f"| {goal:g} | {ck['kind']}{' (auto)' if kind == 'auto' else ''} | ≤ {goal:g} "
                  f"(measured {g['error'] if g['error'] is not None else float('nan'):.3f}, bound {g['bound']:.3f}) | "
                  f"{g['coverage']:.3f} | {err} | {len(decided) / len(yv):.3f} |", flush=True)

    if not args.skip_timing:
        print("\nRetrain of the full head on cached vectors (`hm train --head clothing`, wall time with start-up):")
        for kind in ("mlp", "mlp", "mlp"):
            _, took = hm(["train", "--head", "clothing", "--kind", kind], ws, quiet=True)
            print(f"  --kind {kind}: {took:.1f} s")


if __name__ == "__main__":
    main()
