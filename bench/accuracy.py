"""Real-data accuracy: a clothing head on EfficientNet-Lite0 vectors, beside a logistic-regression probe.

Runs hm as a user would (model-add, embed, train, confusion-matrix) on
../shared/data/clothing laid out as heads/clothing/<class>/ (train) and
test/clothing/<class>/ (validation), then fits scikit-learn's
LogisticRegression on the very same cached vectors and prints both accuracies.

    uv run python bench/accuracy.py [--shared ../shared] [--workdir bench/out/accuracy]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def hm(args: list[str], workspace: Path) -> str:
    env = dict(os.environ, HEADMASTER_WORKSPACE=str(workspace), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "headmaster.cli", *args], env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    print(f"$ hm {' '.join(args)}   ({took:.1f}s, exit {proc.returncode})")
    print(proc.stdout.rstrip())
    if proc.returncode:
        print(proc.stderr.rstrip())
        sys.exit(proc.returncode)
    return proc.stdout


def link_tree(src: Path, dst: Path, every: int = 1) -> None:
    """Symlink every image (or every `every`-th of each class, in name order): the workspace looks like a
    user's, the data is not copied."""
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[::every]:
            (dst / cls.name / f.name).symlink_to(f.resolve())


def probe(workspace: Path, model_name: str, seeds: list[int]) -> tuple[float, list[float], int]:
    """LogisticRegression on the cached vectors (L2-normalised), on all training images and on
    the same 80% split that `hm train --seed S` trains on."""
    from headmaster.heads import stratified_split
    from sklearn.linear_model import LogisticRegression

    conn = sqlite3.connect(workspace / "headmaster.db")
    model_id = conn.execute("SELECT id FROM models WHERE name = ?", (model_name,)).fetchone()[0]
    index = dict(conn.execute("SELECT path, hash FROM files"))
    vectors = {h: np.frombuffer(v, dtype="<f4") for h, v in
               conn.execute("SELECT hash, vector FROM embeddings WHERE model_id = ?", (model_id,))}

    def load(folder: Path):
        x, y = [], []
        for cls in sorted(p.name for p in folder.iterdir()):
            for f in sorted((folder / cls).iterdir()):
                h = index.get(str(f.absolute()))
                if h in vectors:
                    x.append(vectors[h])
                    y.append(cls)
        x = np.stack(x)
        return x / np.linalg.norm(x, axis=1, keepdims=True), np.array(y)

    xtr, ytr = load(workspace / "heads" / "clothing")
    xte, yte = load(workspace / "test" / "clothing")
    full = LogisticRegression(max_iter=3000, C=10.0).fit(xtr, ytr)
    classes = sorted(set(ytr))
    labels = np.array([classes.index(c) for c in ytr])
    split = []
    for seed in seeds:
        train_idx, _ = stratified_split(labels, 0.2, seed)
        clf = LogisticRegression(max_iter=3000, C=10.0).fit(xtr[train_idx], ytr[train_idx])
        split.append(float((clf.predict(xte) == yte).mean()))
    return float((full.predict(xte) == yte).mean()), split, len(yte)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "accuracy")
    parser.add_argument("--keep", action="store_true", help="reuse the workdir (embeddings stay cached)")
    parser.add_argument("--seeds", type=int, default=5, help="train the head with seeds 0..N-1")
    args = parser.parse_args()
    data = args.shared / "data" / "clothing"
    model = args.shared / "models" / "efficientnet-lite0"
    if not data.is_dir() or not model.is_dir():
        sys.exit(f"need {data} and {model}")
    ws = args.workdir.absolute() / "workspace"
    if ws.exists() and not args.keep:
        shutil.rmtree(ws)
    if not ws.exists():
        link_tree(data / "train", ws / "heads" / "clothing")
        link_tree(data / "validation", ws / "test" / "clothing")
        hm(["model-add", "--name", "lite0", "--path", str(model), "--dim", "1280"], ws)
    hm(["embed"], ws)
    head_accs = []
    for seed in range(args.seeds):
        hm(["train", "--head", "clothing", "--seed", str(seed)], ws)
        out = hm(["confusion-matrix", "--head", "clothing", "--test-dir", str(ws / "test" / "clothing")], ws)
        m = re.search(r"Accuracy: (\d+)/(\d+)", out)
        head_accs.append(int(m.group(1)) / int(m.group(2)))
    probe_full, probe_split, n = probe(ws, "lite0", list(range(args.seeds)))
    print()
    print(f"| clothing validation set ({n} images), {args.seeds} seeds (split + init) | mean | per seed |")
    print("|---|---|---|")
    print(f"| hm head (seed MLP, `hm train --seed S`, 80% train split) | {np.mean(head_accs):.3f} | "
          f"{' '.join(f'{a:.3f}' for a in head_accs)} |")
    print(f"| logistic-regression probe, same 80% split | {np.mean(probe_split):.3f} | "
          f"{' '.join(f'{a:.3f}' for a in probe_split)} |")
    print(f"| logistic-regression probe, all training images | {probe_full:.3f} | |")


if __name__ == "__main__":
    main()
