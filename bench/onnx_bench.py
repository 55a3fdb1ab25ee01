"""ONNX Runtime against PyTorch (issue 14): `hm embed` and `hm classify` with each backend, and the export.

For each model (EfficientNet-Lite0 from ../shared/models, and CLIP ViT-B/32 geometry with random
weights, whose speed does not depend on the weights), on clothing photos from ../shared/data/clothing:

  - backbone export into the user cache: seconds, file size, probe-check difference
  - `hm embed --backend torch` and `--backend onnxruntime`, each in a fresh workspace over the same
    photos: images/s after the first batch, and end to end (images / the command's wall time)
  - `hm export --format onnx --check`: seconds, file size, largest probability difference against
    headmaster's own scores
  - `hm classify` of ten new photos (copies of one trained workspace, cached export): wall time per
    backend, and the largest probability difference between the two backends' rows

Usage:
  uv run python bench/onnx_bench.py                              # both models, 64 photos (a few minutes)
  uv run python bench/onnx_bench.py --models lite0 --images 32
  uv run python bench/onnx_bench.py --tiny                       # tiny CLIP and synthetic images: seconds
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CLASSES = ("dress", "hat", "shoes")


def hm(args: list[str], workspace: Path, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "headmaster.cli", *args], capture_output=True, text=True,
                         env=dict(env, HEADMASTER_WORKSPACE=str(workspace)), cwd=workspace.parent, timeout=1800)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"hm {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out, seconds


def timings(stderr: str) -> dict:
    line = next(l for l in stderr.splitlines() if l.startswith("timings "))
    return json.loads(line[len("timings "):])


def photos(shared: Path, split: str, per_class: int, tiny: bool, work: Path) -> dict[str, list[Path]]:
    """Clothing photos per class (or synthetic ones with --tiny)."""
    out: dict[str, list[Path]] = {}
    for i, c in enumerate(CLASSES):
        if tiny:
            from tests.helpers import COLOURS, colour_image

            colour = list(COLOURS)[i]
            out[c] = [colour_image(work / "synthetic" / split / c / f"{c}{j}.png", colour, 1000 * i + j + (500 if
                      split == "validation" else 0)) for j in range(per_class)]
        else:
            out[c] = sorted((shared / "data" / "clothing" / split / c).glob("*.jpg"))[:per_class]
    return out


def build_models(shared: Path, work: Path, which: list[str], tiny: bool) -> dict[str, tuple[Path, int]]:
    models: dict[str, tuple[Path, int]] = {}
    spec = importlib.util.spec_from_file_location("bench_embed", ROOT / "bench" / "embed.py")
    bench_embed = importlib.util.module_from_spec(spec)
    sys.modules["bench_embed"] = bench_embed  # its dataclasses look their module up
    spec.loader.exec_module(bench_embed)
    if tiny:
        models["tiny-clip"] = bench_embed.build_model(work / "tiny-clip", tiny=True)
        return models
    if "lite0" in which:
        models["efficientnet-lite0"] = (shared / "models" / "efficientnet-lite0", 1280)
    if "clip" in which:
        models["clip-b32-geometry"] = bench_embed.build_model(work / "clip-b32", tiny=False)
    return models


def prob_columns(text: str) -> dict[tuple[str, str], float]:
    rows = csv.DictReader(io.StringIO(text))
    return {(r["image"], k): float(v) for r in rows for k, v in r.items()
            if k != "image" and not k.endswith("prediction")}


def run_model(name: str, path: Path, dim: int, train_photos: dict, new_photos: list[Path], work: Path,
              env: dict) -> dict:
    from headmaster.embedding.onnx.backbone import export_backbone, find_export
    from headmaster.store import Model

    result: dict = {"model": name}
    model = Model(0, name, str(path), dim, True)
    old = find_export(model)
    if old is not None:
        old.onnx_path.unlink(missing_ok=True)
        old.onnx_path.with_suffix(".json").unlink(missing_ok=True)
    started = time.perf_counter()
    export = export_backbone(model)
    result["backbone_export_s"] = time.perf_counter() - started
    if not export.ok:
        raise SystemExit(f"{name}: backbone export failed: {export.reason}")
    result["backbone_onnx_mb"] = export.onnx_path.stat().st_size / 1e6
    result["backbone_probe_diff"] = export.max_diff

    images = sum(len(v) for v in train_photos.values())
    base = work / f"{name}-base" / "workspace"
    for c, files in train_photos.items():
        (base / "heads" / "clothes" / c).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, base / "heads" / "clothes" / c / f.name)
    hm(["model-add", "--name", name, "--path", str(path), "--dim", str(dim)], base, env)
    for backend in ("torch", "onnxruntime"):
        ws = work / f"{name}-{backend}" / "workspace"
        shutil.copytree(base, ws)
        out, seconds = hm(["embed", "--backend", backend], ws, dict(env, HEADMASTER_TIMINGS="1"))
        t = timings(out.stderr)
        assert t["embedded"] == images and t["backend"] == backend, t
        rest = t["embedded"] - t["first_batch_images"]  # nan with one batch only: use more --images
        after_first = rest / (t["embed_seconds"] - t["first_batch_seconds"]) if rest else float("nan")
        result[backend] = {"img_s_after_first_batch": after_first, "img_s_embedding": t["images_per_second"],
                           "img_s_end_to_end": t["embedded"] / seconds, "command_s": seconds,
                           "load_s": t["load_seconds"], "batch_size": t["batch_size"],
                           "peak_rss_mib": t["peak_rss_mib"]}
    trained = work / f"{name}-onnxruntime" / "workspace"
    out, seconds = hm(["train", "--epochs", "30", "--backend", "torch"], trained, env)
    dest = work / f"{name}-export"
    out, seconds = hm(["export", "--dest", str(dest), "--format", "onnx", "--check"], trained, env)
    result["classifier_export_s"] = seconds
    result["classifier_onnx_mb"] = (dest / "classifier.onnx").stat().st_size / 1e6
    result["check_max_prob_diff"] = max(float(x) for x in re.findall(r"difference ([0-9.e+-]+)", out.stdout))

    src = work / f"{name}-new"
    src.mkdir()
    for f in new_photos:
        shutil.copy2(f, src / f.name)
    rows = {}
    for backend in ("torch", "onnxruntime"):
        ws = work / f"{name}-classify-{backend}" / "workspace"
        shutil.copytree(trained, ws)
        out, seconds = hm(["classify", "--heads", "clothes", "--src", str(src), "--format", "csv",
                           "--backend", backend], ws, env)
        result[backend]["classify_10_s"] = seconds
        rows[backend] = prob_columns(out.stdout)
    result["classify_max_prob_diff"] = max(abs(rows["torch"][k] - rows["onnxruntime"][k]) for k in rows["torch"])
    result["speedup_after_first_batch"] = (result["onnxruntime"]["img_s_after_first_batch"]
                                           / result["torch"]["img_s_after_first_batch"])
    result["speedup_end_to_end"] = result["onnxruntime"]["img_s_end_to_end"] / result["torch"]["img_s_end_to_end"]
    return result


def table(results: list[dict], images: int) -> str:
    lines = ["| model | backend | img/s after 1st batch | img/s end to end | hm embed wall s | "
             "hm classify 10 photos s |", "|---|---|---|---|---|---|"]
    for r in results:
        for b in ("torch", "onnxruntime"):
            x = r[b]
            lines.append(f"| {r['model']} | {b} | {x['img_s_after_first_batch']:.1f} | {x['img_s_end_to_end']:.1f} | "
                         f"{x['command_s']:.1f} | {x['classify_10_s']:.1f} |")
    lines += ["", "| model | ORT/torch after 1st batch | ORT/torch end to end | backbone export s | backbone MB | "
              "probe diff | classifier export s (with --check) | classifier MB | --check max prob diff | "
              "classify ORT vs torch max prob diff |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['speedup_after_first_batch']:.2f}x | {r['speedup_end_to_end']:.2f}x | "
                     f"{r['backbone_export_s']:.1f} | {r['backbone_onnx_mb']:.1f} | {r['backbone_probe_diff']:.1e} | "
                     f"{r['classifier_export_s']:.1f} | {r['classifier_onnx_mb']:.1f} | "
                     f"{r['check_max_prob_diff']:.1e} | {r['classify_max_prob_diff']:.1e} (CSV, 4 decimals) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--models", default="lite0,clip", help="lite0, clip or both")
    parser.add_argument("--images", type=int, default=64, help="photos embedded per backend")
    parser.add_argument("--tiny", action="store_true", help="tiny CLIP, synthetic images: a smoke test")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="hm-bench-onnx-"))
    cache = work / "cache"
    os.environ["XDG_CACHE_HOME"] = str(cache)  # fresh exports, nothing left in the user's cache
    env = dict(os.environ)
    per_class = max(1, args.images // len(CLASSES))
    train_photos = photos(args.shared, "train", per_class, args.tiny, work)
    new = photos(args.shared, "validation", 4, args.tiny, work)
    new_photos = [p for files in new.values() for p in files][:10]
    models = build_models(args.shared, work, args.models.split(","), args.tiny)
    load = os.getloadavg()
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load average before "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {per_class * len(CLASSES)} photos per backend")
    results = [run_model(n, p, d, train_photos, new_photos, work, env) for n, (p, d) in models.items()]
    load = os.getloadavg()
    print(table(results, per_class * len(CLASSES)))
    print(f"load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
