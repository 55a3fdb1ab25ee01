"""LP-FT on real photos: frozen head, logistic-regression probe and LP-FT heads on the clothing validation set.

../shared/data/clothing/train/ becomes heads/clothing/<class>/ (fine-tuned on, with the usual
80/20 split), validation/ is the test set nobody trains on. Base model:
../shared/models/efficientnet-lite0. For each seed: the frozen head (`hm train --seed S`), a
logistic-regression probe on the same 80% split, and `hm finetune --heads clothing --seed S`
(the library function the command calls), then what the user has afterwards: if the fine-tuned
model won on the split's validation images, its retrained head, scored on validation/ with vectors
from the adapter folder loaded as a registered model (the merged model, as every command uses
it); if not, the frozen head it left in place (`--activate` scores the new model always). The trunk activations are computed once and reused by every seed
(an image's augmented views depend on the image only). Prints a Markdown table and the time of
every stage.

    uv run python bench/finetune.py [--shared ../shared] [--seeds 3] [--ft-epochs N] [--blocks N] [--views N] [--lr X] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from accuracy import link_tree  # noqa: E402

from headmaster.embedding import (Context, EmbedOptions, activate_model, add_model, embed_paths, vectors_for)  # noqa: E402
from headmaster.finetune.data import ViewCache  # noqa: E402
from headmaster.finetune.train import FinetuneConfig, finetune  # noqa: E402
from headmaster.heads import TrainConfig, embed_heads, load_head, stratified_split, train_one  # noqa: E402
from headmaster.workspace import list_images  # noqa: E402


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def labelled(folder: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    paths, labels = [], []
    for i, c in enumerate(classes):
        for f in list_images(folder / c)[0]:
            paths.append(f)
            labels.append(i)
    return paths, np.array(labels), classes


def test_vectors(ctx: Context, model_name: str, paths: list[Path]) -> tuple[np.ndarray, float]:
    model = ctx.store.model(model_name)
    t0 = time.perf_counter()
    result = embed_paths(ctx.store, model, paths, device=ctx.options.device, progress=False)
    vectors = vectors_for(ctx.store, model, result.hashes)
    return np.stack([vectors[p] for p in paths]), time.perf_counter() - t0


def head_accuracy(ctx: Context, x: np.ndarray, y: np.ndarray, classes: list[str]) -> float:
    head = load_head(ctx.workspace.checkpoint_path("clothing"))
    assert head.classes == classes
    return float((head.predict_labels(head.predict_proba(x)) == y).mean())


def probe_accuracy(ctx: Context, model_name: str, seed: int, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """LogisticRegression(C=10) on L2-normalised vectors of the same 80% split the head trains on."""
    from sklearn.linear_model import LogisticRegression

    from headmaster.heads import labelled_rows

    model = ctx.store.model(model_name)
    head = ctx.workspace.head("clothing")
    result = embed_paths(ctx.store, model, [p for p, _ in head.labelled_images()], progress=False)
    rows, labels, _, _ = labelled_rows(ctx, model, head, result)
    x, y = np.stack(rows), np.array(labels)
    train_idx, _ = stratified_split(y, 0.2, seed)
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    clf = LogisticRegression(max_iter=3000, C=10.0).fit(unit(x[train_idx]), y[train_idx])
    return float((clf.predict(unit(x_test)) == y_test).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "finetune")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ft-epochs", type=int, default=None)
    parser.add_argument("--blocks", type=int, default=None)
    parser.add_argument("--views", type=int, default=None)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--head-lr", type=float, default=None, help="learning rate of the heads in stage 2 "
                        "(default: a tenth of --lr, as hm finetune; 0 keeps the stage-1 heads fixed)")
    parser.add_argument("--every", type=int, default=1,
                        help="fine-tune on every Nth training image of each class only (a documented subset when "
                             "the full set does not fit the time); validation/ is always whole")
    parser.add_argument("--keep", action="store_true",
                        help="keep the workdir's database (cached vectors) and trunk activations (views.pt)")
    parser.add_argument("--activate", action="store_true",
                        help="activate every fine-tuned model (hm finetune --activate); by default a model that "
                             "does not beat the frozen head on the split's validation images leaves it in place, "
                             "as the command does, and the frozen head is what gets scored")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    data, base_path = args.shared / "data" / "clothing", args.shared / "models" / "efficientnet-lite0"
    if not data.is_dir() or not base_path.is_dir():
        sys.exit(f"need {data} and {base_path}")
    ws = args.workdir.absolute() / "workspace"
    if ws.exists():
        shutil.rmtree(ws / "heads", ignore_errors=True)
        if not args.keep:
            shutil.rmtree(ws)
    link_tree(data / "train", ws / "heads" / "clothing", args.every)
    test_paths, y_test, classes = labelled(data / "validation")
    print(f"start: {uptime()}", flush=True)
    times: dict[str, float | list[float]] = {}
    rows: list[dict] = []
    views = ViewCache()
    views_file = args.workdir.absolute() / f"views-every{args.every}-blocks{args.blocks}-views{args.views}.pt"
    if args.keep and views_file.exists():  # trunk activations of an earlier run with the same base and subset
        import torch

        saved = torch.load(views_file, weights_only=True)
        views = ViewCache(saved["plain"], saved["augmented"], saved["failed"])
        print(f"reusing {len(views.plain)} images' trunk activations from {views_file}", flush=True)
    with Context.open(str(ws), EmbedOptions(progress=sys.stderr.isatty())) as ctx:
        for m in ctx.store.models():  # earlier fine-tuned models (--keep): their folders were removed
            if m.name != "lite0":
                ctx.store.remove_model(m.name)
        shutil.rmtree(ws / "models", ignore_errors=True)
        if not any(m.name == "lite0" for m in ctx.store.models()):
            add_model(ctx.store, "lite0", str(base_path), 1280)
        activate_model(ctx.store, "lite0")
        print(f"training images: {len(ctx.workspace.head('clothing').labelled_images())} "
              f"(every {args.every} of each class)", flush=True)
        t0 = time.perf_counter()
        embed_heads(ctx, "clothing")
        times["embed train/ with the base"] = time.perf_counter() - t0
        x_base, times["embed validation/ with the base"] = test_vectors(ctx, "lite0", test_paths)
        for seed in range(args.seeds):
            activate_model(ctx.store, "lite0")
            t0 = time.perf_counter()
            train_one(ctx, "clothing", TrainConfig(seed=seed))
            t_head = time.perf_counter() - t0
            frozen = head_accuracy(ctx, x_base, y_test, classes)
            probe = probe_accuracy(ctx, "lite0", seed, x_base, y_test)
            config = FinetuneConfig(rank=args.rank, alpha=2.0 * args.rank, ft_epochs=args.ft_epochs,
                                    blocks=args.blocks, views=args.views, lr=args.lr,
                                    head_lr=args.lr / 10 if args.head_lr is None else args.head_lr,
                                    seed=seed)
            t0 = time.perf_counter()
            report = finetune(ctx, ["clothing"], f"lite0-ft-seed{seed}", config, activate=args.activate,
                              views=views, say=lambda s: print("  " + s, flush=True))
            t_ft = time.perf_counter() - t0
            if not views_file.exists():
                import torch

                torch.save({"plain": views.plain, "augmented": views.augmented, "failed": views.failed}, views_file)
            # what the user has afterwards: the new model and its retrained head, or (not improved) the frozen head
            active = ctx.store.active_model().name
            x_ft, t_test = test_vectors(ctx, active, test_paths) if active != "lite0" else (x_base, 0.0)
            lpft = head_accuracy(ctx, x_ft, y_test, classes)
            row = {"seed": seed, "frozen": frozen, "probe": probe, "lpft": lpft,
                   "val_frozen": report.frozen_accuracy, "val_lpft": report.best_accuracy,
                   "best_epoch": report.best_epoch, "activated": report.activated,
                   "val_retrained": [r.metrics["accuracy"] for r in report.retrained], "reverted": report.reverted, "head_seconds": t_head, "finetune_seconds": t_ft,
                   "trunk_seconds": report.trunk_seconds, "ft_seconds": report.ft_seconds,
                   "epoch_seconds": [e.seconds for e in report.epochs[1:]],
                   "test_embed_seconds": t_test, "config": vars(report.config) if hasattr(report.config, "__dict__")
                   else str(report.config)}
            rows.append(row)
            print(f"seed {seed}: frozen head {frozen:.3f}, probe {probe:.3f}, LP-FT {lpft:.3f} "
                  f"(split validation {report.frozen_accuracy:.3f} -> {report.best_accuracy:.3f}, "
                  f"best epoch {report.best_epoch}, retrained head {row['val_retrained']}, "
                  f"{'activated' if report.activated else 'base kept'}); finetune {t_ft:.0f}s (trunk pass {report.trunk_seconds:.0f}s, "
                  f"epochs {' '.join(f'{s:.0f}' for s in row['epoch_seconds'])}s), test embed {t_test:.0f}s",
                  flush=True)
    print(f"end: {uptime()}")
    cfg = rows[0]["config"]
    print()
    print(f"Config: {cfg}")
    print(f"| clothing validation/ ({len(y_test)} images), {len(rows)} seeds | mean | per seed |")
    print("|---|---|---|")
    for key, label in (("frozen", "frozen head (`hm train --seed S`)"),
                       ("probe", "logistic-regression probe, same 80% split"),
                       ("lpft", "after `hm finetune --seed S`: the retrained head if it won, else the frozen head")):
        values = [r[key] for r in rows]
        print(f"| {label} | {np.mean(values):.3f} | {' '.join(f'{v:.3f}' for v in values)} |")
    gain = np.mean([r["lpft"] - r["frozen"] for r in rows])
    print(f"| LP-FT minus frozen head | {gain * 100:+.1f} points | |")
    print()
    for k, v in times.items():
        print(f"- {k}: {v:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "times": times}, indent=2, default=str))


if __name__ == "__main__":
    main()
