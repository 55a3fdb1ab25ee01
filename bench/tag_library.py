"""hm tag on a nested photo library: img/s against hm classify on the same photos, and the re-tag after a retrain.

    uv run python bench/tag_library.py [--shared ../shared] [--limit N] [--train-per-class N] [--repeats N] [--work DIR]

Two heads over the real backbone (../shared/models/efficientnet-lite0, registered as `lite0`):
`clothing` (multi-class, the 10 classes of ../shared/data/clothing/train) and `hat` (binary: hat
against the other classes). The library is a nested tree of hard links (copies across file
systems) to the photos of both splits: lib/<split>/<class>/<first two letters>/photo.jpg.

Runs, each `uv run hm ...` in a fresh process as a user types it:
  classify  `hm classify --heads clothing,hat --src FLAT --format csv --output ...` on a flat folder of
            the same photos, their vectors removed from the cache first (cold)
  tag       `hm tag LIB --heads clothing,hat`, vectors and sidecars removed first (cold): XMP sidecars written
            (classify and tag alternate, --repeats pairs; the medians are shown)
  retag     `hm train --head hat --seed 1`, then `hm tag LIB` again: vectors cached, every sidecar updated
  rerun     `hm tag LIB` once more, nothing changed: every image skipped unread
Prints a Markdown table: wall seconds (with start-up), images, img/s, and hm tag's own summary line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def hm(args: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run(["uv", "run", "--project", str(REPO), "hm", "--no-progress", *args], capture_output=True,
                         text=True, env=env)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        sys.exit(f"hm {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return seconds, (out.stdout + out.stderr).strip()


def forget_vectors(db: Path, photos: list[Path]) -> None:
    """Remove the vectors of these contents (and the file index's memory of their paths): the next run is cold."""
    import hashlib

    hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in photos}
    with sqlite3.connect(db) as conn:
        conn.executemany("DELETE FROM embeddings WHERE hash = ?", [(h,) for h in hashes])
        conn.execute("DELETE FROM files WHERE path NOT LIKE ?", (f"{db.parent}%",))


def forget_sidecars(db: Path, lib: Path) -> None:
    """Remove our sidecars under `lib` and their records: the next hm tag writes every one anew."""
    for x in lib.rglob("*.xmp"):
        x.unlink()
    with sqlite3.connect(db) as conn:
        for table, column in (("tags", "path"), ("tag_sidecars", "image"), ("tag_checks", "path")):
            try:
                conn.execute(f"DELETE FROM {table} WHERE {column} LIKE ?", (f"{lib}%",))
            except sqlite3.OperationalError:  # the tables come with the first hm tag
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--limit", type=int, default=None, help="Photos in the library (default: all).")
    ap.add_argument("--train-per-class", type=int, default=None, help="Training photos per class (default: all).")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="Cold classify/tag pairs, alternating (default 3).")
    args = ap.parse_args()
    data, backbone = args.shared / "data" / "clothing", args.shared / "models" / "efficientnet-lite0"
    work = Path(args.work or tempfile.mkdtemp(prefix="hm-tag-bench-"))
    ws, lib, flat = work / "workspace", work / "lib", work / "flat"
    env = dict(os.environ, HEADMASTER_WORKSPACE=str(ws), HF_HUB_OFFLINE="1")

    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    for c in classes:
        photos = sorted((data / "train" / c).iterdir())[: args.train_per_class]
        for p in photos:
            link(p, ws / "heads" / "clothing" / c / p.name)
            link(p, ws / "heads" / "hat" / ("positive" if c == "hat" else "negative") / p.name)
    every = sorted(p for split in ("train", "validation") for p in (data / split).rglob("*") if p.is_file())
    if args.limit:
        every = every[:: max(1, len(every) // args.limit)][: args.limit]  # spread over every class
    for p in every:
        split, c = p.parent.parent.name, p.parent.name
        link(p, lib / split / c / p.name[:2] / p.name)
        link(p, flat / f"{split}-{c}-{p.name}")
    print(f"load average before: {os.getloadavg()[0]:.2f}; {len(every)} photos; work {work}")
    hm(["model-add", "--name", "lite0", "--path", str(backbone), "--dim", "1280"], env)
    train_s, _ = hm(["train"], env)
    print(f"trained clothing and hat in {train_s:.0f} s")

    rows = []
    classify_s, tag_s = [], []
    for i in range(args.repeats):  # cold pairs, alternating, so a load swing hits both commands alike
        forget_vectors(ws / "headmaster.db", every)
        s, out = hm(["classify", "--heads", "clothing,hat", "--src", str(flat), "--format", "csv", "--output",
                     str(work / "classify.csv"), "--overwrite"], env)
        classify_s.append(s)
        forget_vectors(ws / "headmaster.db", every)
        forget_sidecars(ws / "headmaster.db", lib)
        s, out = hm(["tag", str(lib), "--heads", "clothing,hat"], env)
        tag_s.append(s)
        print(f"pair {i + 1}: classify {classify_s[-1]:.1f} s, tag {s:.1f} s", flush=True)
    runs = f" (cold, median of {args.repeats})" if args.repeats > 1 else " (cold)"
    rows.append((f"hm classify --heads clothing,hat --format csv{runs}", statistics.median(classify_s), ""))
    rows.append((f"hm tag LIB --heads clothing,hat{runs}", statistics.median(tag_s), out.splitlines()[-1]))
    train_s, _ = hm(["train", "--head", "hat", "--seed", "1"], env)
    s, out = hm(["tag", str(lib), "--heads", "clothing,hat"], env)
    rows.append((f"hm tag after `hm train --head hat --seed 1` ({train_s:.0f} s)", s, out.splitlines()[-1]))
    s, out = hm(["tag", str(lib), "--heads", "clothing,hat"], env)
    rows.append(("hm tag again, nothing changed", s, out.splitlines()[-1]))

    print(f"\nMachine: {os.cpu_count()} cores, load average after {os.getloadavg()[0]:.2f}\n")
    print("| run | wall s (with start-up) | photos | img/s (wall) | hm's summary |")
    print("|---|---|---|---|---|")
    for label, seconds, summary in rows:
        print(f"| {label} | {seconds:.1f} | {len(every)} | {len(every) / seconds:.1f} | {summary} |")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
