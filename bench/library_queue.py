"""The review page's library queue on a 3,400-photo library: how long ranking it takes, from cached vectors.

    uv run python bench/library_queue.py [--shared ../shared] [--repeats 5] [--per-class 20]

The library is a nested tree of hard links to every photo of ../shared/data/clothing (train and
validation: lib/<split>/<class>/<first two letters>/photo.jpg); the head `clothing` has --per-class
training photos of each of the 10 classes (the same files, so those count as examples and are left
out). Every photo gets a 1280-dimensional vector in the cache, as hmd leaves one when it tags the
library (here a class-dependent random vector: the ranking's cost does not depend on what the
vectors mean, and no model time is spent), and the file index knows each file, as after `hm tag`.

Times, each the median of --repeats:
  rank_library   curation.rank_library in-process: list the tree (stat only), read the file index and
                 the vectors, score, sort
  page JSON      GET /heads/clothing/library/lib.json?limit=60 from the real server over a socket,
                 ReviewService + LocalWorker (what `hm serve` runs; hmd runs the same on its worker)
  page HTML      GET /heads/clothing/library/lib, the rendered page with 60 cards
Checks that the cache holds the same number of vectors before and after (nothing embedded).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tag_library import link  # bench/: hard links to the shared photos, copies across file systems

REPO = Path(__file__).resolve().parent.parent
DIM = 1280


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--per-class", type=int, default=20)
    args = ap.parse_args()

    import numpy as np

    from headmaster.config import LibraryConfig
    from headmaster.curation import rank_library
    from headmaster.daemon import LocalWorker
    from headmaster.embedding import Context, EmbedOptions
    from headmaster.heads import TrainConfig, train_one
    from headmaster.store import FileRecord
    from headmaster.web import ReviewService, WebServer

    data = args.shared / "data" / "clothing"
    work = Path(tempfile.mkdtemp(prefix="hm-libqueue-bench-"))
    ws, lib = work / "workspace", work / "lib"
    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    every = sorted(p for split in ("train", "validation") for p in (data / split).rglob("*.jpg"))
    for p in every:
        link(p, lib / p.parent.parent.name / p.parent.name / p.name[:2] / p.name)
    examples = [p for c in classes for p in sorted((data / "train" / c).glob("*.jpg"))[: args.per_class]]
    for p in examples:
        link(p, ws / "heads" / "clothing" / p.parent.name / p.name)

    rng = np.random.default_rng(0)
    centres = {c: rng.normal(size=DIM) for c in classes}
    files = [*(lib.rglob("*.jpg")), *((ws / "heads").rglob("*.jpg"))]
    try:
        with Context.open(str(ws), EmbedOptions(device="cpu", progress=False)) as c:
            model = c.store.add_model("lite0", str(args.shared / "models" / "efficientnet-lite0"), DIM)
            c.store.activate_model("lite0")
            records, vectors = [], {}
            for f in files:
                h = hashlib.sha256(f.read_bytes()).hexdigest()
                st = f.stat()
                records.append(FileRecord(str(f), st.st_size, st.st_mtime_ns, st.st_ino, h))
                cls = f.parent.name if f.parent.name in centres else f.parent.parent.name
                vectors[h] = (centres[cls] + 2.0 * rng.normal(size=DIM)).astype("float32")
            c.store.put_file_records(records)
            c.store.put_vectors(model.id, vectors.items())
            train_one(c, "clothing", TrainConfig(epochs=30))
            cached = c.store.embedding_count()
            rank_s, ranking = timed(lambda: rank_library(c, lib, "clothing", limit=60), args.repeats)
            assert c.store.embedding_count() == cached
        print(f"{len(every)} photos in the library, {len(examples)} examples; load average {os.getloadavg()[0]:.2f}")
        print(f"ranking: photos {ranking.photos}, scored {ranking.scored}, waiting {ranking.waiting}, "
              f"examples {ranking.examples}")

        from headmaster.workspace import Workspace

        models = LocalWorker(Workspace(ws), EmbedOptions(device="cpu", progress=False))
        service = ReviewService(Workspace(ws), models.call, libraries=[LibraryConfig(path=str(lib))])
        server = WebServer(service, "127.0.0.1:0")
        url = server.start()
        try:
            def get(path: str) -> bytes:
                with urllib.request.urlopen(url + path, timeout=120) as r:
                    return r.read()

            get("heads/clothing/library/lib.json")  # the worker's first call loads the head
            json_s, body = timed(lambda: get("heads/clothing/library/lib.json?limit=60"), args.repeats)
            html_s, page = timed(lambda: get("heads/clothing/library/lib"), args.repeats)
            assert page.count(b'class="card from-library"') == 60, "60 cards"
        finally:
            server.stop()
            service.close()
            models.close()
        with Context.open(str(ws), EmbedOptions(device="cpu", progress=False)) as c:
            assert c.store.embedding_count() == cached, "nothing embedded"

        print(f"\nMachine: {os.cpu_count()} cores, load average after {os.getloadavg()[0]:.2f}\n")
        print("| step | median s | photos |")
        print("|---|---|---|")
        print(f"| rank_library (in-process, limit 60) | {rank_s:.3f} | {ranking.photos} |")
        print(f"| GET /heads/clothing/library/lib.json?limit=60 (server + worker thread) | {json_s:.3f} | "
              f"{ranking.photos} |")
        print(f"| GET /heads/clothing/library/lib (page, 60 cards) | {html_s:.3f} | {ranking.photos} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path[:0] = [str(REPO)]
    main()
