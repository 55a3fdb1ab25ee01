"""The Ray engine against the local one (hm embed --engine ray): img/s, Ray's start-up, decode cost, driver writes.

On the same files and model, each run in a fresh workspace (nothing cached):

  (a) `hm embed` (the local engine) as a subprocess, its rate from HEADMASTER_TIMINGS
  (b) Ray's start-up: `import ray.data` and ray.init() of a local instance (num_cpus = the cores)
  (c) embed_paths_ray with 1 and then 2 CPU actors on that instance: img/s after start-up, and the time to the
      first vectors (the actor pool starting: a new process imports ray.data and loads the model)
  (d) the decode cost per image: prepare_image (read, decode at reduced size, the model's preprocessing) in
      one thread, the CPU work every image costs a decode task
  (e) the driver's SQLite write rate for vectors (put_vectors; 1280-d as here, 512-d as ViT-B/32; batches of
      16, 64, 512)

Usage:
  uv run python bench/ray_embed.py                          # ../shared, 300 photos, efficientnet-lite0
  uv run python bench/ray_embed.py --images 3400            # every photo (slow on 2 busy cores)
  uv run python bench/ray_embed.py --shared /path/to/shared --images 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # as hm sets it: workers use this venv as it is
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def photos(shared: Path, n: int) -> list[tuple[str, Path]]:
    """(class, path) for the first n photos, taken round-robin over the classes of train/."""
    train = shared / "data" / "clothing" / "train"
    classes = sorted(p for p in train.iterdir() if p.is_dir())
    lists = [sorted(c.glob("*.jp*g")) for c in classes]
    out: list[tuple[str, Path]] = []
    i = 0
    while len(out) < n and any(i < len(l) for l in lists):
        for c, l in zip(classes, lists):
            if i < len(l) and len(out) < n:
                out.append((c.name, l[i]))
        i += 1
    return out


def workspace(root: Path, files: list[tuple[str, Path]], model_path: Path) -> Path:
    """A workspace whose one head links to the photos (symlinks: the photos are only read)."""
    from headmaster.store import Store

    ws = root / "workspace"
    for cls, path in files:
        target = ws / "heads" / "clothing" / cls / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
    with Store(ws / "headmaster.db") as store:
        store.add_model("efficientnet-lite0", str(model_path), 1280)
    return ws


def run_local(ws: Path) -> dict:
    env = dict(os.environ, HEADMASTER_TIMINGS="1")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "headmaster.cli", "--workspace", str(ws), "embed"],
                          capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - t
    line = next(l for l in proc.stderr.splitlines() if l.startswith("timings "))
    numbers = json.loads(line[len("timings "):])
    return {"wall_s": round(wall, 1), "embedded": numbers["embedded"],
            "img_s": round(numbers["images_per_second"], 1), "load_s": round(numbers["load_seconds"], 1),
            "backend": numbers["backend"], "summary": proc.stdout.strip()}


def run_ray(ws: Path, actors: int, batch: int) -> dict:
    from headmaster.embedding import Context, EmbedOptions, RayOptions, embed_paths_ray
    from headmaster.heads import labelled_paths

    with Context.open(str(ws), EmbedOptions(progress=False)) as c:
        paths = labelled_paths(c, None)
        t = time.perf_counter()
        r = embed_paths_ray(c.store, c.active_model(), paths, RayOptions(workers=actors, batch_size=batch,
                                                                          progress=False))
        wall = time.perf_counter() - t
    run = r.seconds - r.start_seconds
    return {"actors": actors, "wall_s": round(wall, 1), "embedded": r.embedded, "failed": r.failed,
            "driver_prep_s": round(r.start_seconds, 1), "first_vectors_s": round(r.first_batch_seconds, 1),
            "img_s": round(r.embedded / run, 2) if run > 0 else 0.0,
            "backend": r.backend, "summary": r.summary("efficientnet-lite0")}


def decode_cost(files: list[tuple[str, Path]], model_path: Path) -> dict:
    from headmaster.embedding import prepare_image
    from headmaster.embedding.backends import backend_embedder
    from headmaster.store import Model

    embedder = backend_embedder(Model(0, "efficientnet-lite0", str(model_path), 1280, True), "auto", "cpu")
    sample = [p for _, p in files[:100]]
    prepare_image(sample[0], embedder.input_side, embedder.preprocess)  # warm
    t = time.perf_counter()
    cpu = time.process_time()
    for p in sample:
        prepare_image(p, embedder.input_side, embedder.preprocess)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    sizes = [p.stat().st_size for p in sample]
    return {"images": len(sample), "ms_per_image_wall": round(wall / len(sample) * 1000, 1),
            "ms_per_image_cpu": round(cpu / len(sample) * 1000, 1), "mean_file_kib": round(np.mean(sizes) / 1024)}


def sqlite_rate(dim: int, total: int = 20_000) -> dict:
    from headmaster.store import Store

    out = {}
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((total, dim)).astype(np.float32)
    for batch in (16, 64, 512):
        with tempfile.TemporaryDirectory() as d, Store(Path(d) / "headmaster.db") as store:
            model = store.add_model("m", "/m", dim)
            t = time.perf_counter()
            for i in range(0, total, batch):
                store.put_vectors(model.id, ((f"{j:064x}", vectors[j]) for j in range(i, min(total, i + batch))))
            out[f"dim_{dim}_batch_{batch}_vectors_s"] = round(total / (time.perf_counter() - t))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    model_path = args.shared / "models" / "efficientnet-lite0"
    files = photos(args.shared, args.images)
    result: dict = {"images": len(files), "cores": os.cpu_count(), "load_avg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result["decode"] = decode_cost(files, model_path)
        print("decode", result["decode"], flush=True)
        result["sqlite"] = {**sqlite_rate(1280), **sqlite_rate(512)}
        print("sqlite", result["sqlite"], flush=True)
        result["local"] = run_local(workspace(tmp / "local", files, model_path))
        print("local", result["local"], flush=True)
        t = time.perf_counter()
        import ray
        import ray.data  # noqa: F401

        result["ray_import_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", configure_logging=True)
        result["ray_init_s"] = round(time.perf_counter() - t, 1)
        print("ray start", result["ray_import_s"], result["ray_init_s"], flush=True)
        for actors in (1, 2):
            result[f"ray_{actors}"] = run_ray(workspace(tmp / f"ray{actors}", files, model_path), actors,
                                              args.batch_size)
            print(f"ray {actors}", result[f"ray_{actors}"], flush=True)
        ray.shutdown()
    result["load_avg_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
