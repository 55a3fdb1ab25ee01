"""The embedding pipeline: paths -> hashes -> cache look-up -> decode -> forward -> vectors in SQLite.

The only way vectors are made, for `hm embed`, `hm train`, `hm classify` and the
daemon alike. Unchanged files are recognised by their stat signature in the file
index and never read; decoding runs in worker threads, a bounded window ahead
of the forward pass, so memory stays flat however many files there are.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
from PIL import ImageOps
from tqdm import tqdm

from headmaster.embedders import Embedder, get_embedder
from headmaster.images import ImageError, file_sha256, load_image
from headmaster.store import FileRecord, Model, Store

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass
class EmbedResult:
    """What happened to each path given to `embed_paths`."""

    hashes: dict[Path, str] = field(default_factory=dict)  # usable images only: path -> content hash
    embedded: int = 0  # vectors computed now (unique contents)
    cached: int = 0  # files whose vector was already in the cache
    skipped: list[Skipped] = field(default_factory=list)
    hashed: int = 0  # files read and hashed (new or changed since last seen)
    seconds: float = 0.0
    embed_seconds: float = 0.0  # decode + forward time for the `embedded` images

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def summary(self, model_name: str) -> str:
        parts = [f"{self.cached} cached"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        rate = f", {self.images_per_second:.1f} img/s" if self.embedded else ""
        return (f"Embedded {self.embedded} images with {model_name} ({', '.join(parts)}) "
                f"in {self.seconds:.1f}s{rate}")


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def default_batch_size(embedder: Embedder) -> int:
    return 64 if embedder.device.type in ("cuda", "mps") else 16


def progress_enabled(requested: bool | None) -> bool:
    """Progress bars only on a terminal unless asked for explicitly."""
    return sys.stderr.isatty() if requested is None else requested


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, depth: int) -> Iterator[tuple[T, R]]:
    """Like executor.map, but at most `depth` items in flight: memory stays flat."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hm-decode") as pool:
        source = iter(items)
        pending = deque((item, pool.submit(fn, item)) for item in itertools.islice(source, depth))
        while pending:
            item, future = pending.popleft()
            for nxt in itertools.islice(source, 1):
                pending.append((nxt, pool.submit(fn, nxt)))
            yield item, future.result()


def _stat_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def hash_paths(store: Store, paths: list[Path], workers: int | None = None) -> tuple[dict[Path, str], list[Skipped], int]:
    """Content hashes for `paths`; files whose size, mtime and inode match the index are not read.

    Returns (hashes, skipped, number of files actually read).
    """
    keys = {p: str(Path(p).absolute()) for p in paths}
    known = store.file_records(keys.values())
    hashes: dict[Path, str] = {}
    skipped: list[Skipped] = []
    to_read: list[tuple[Path, tuple[int, int, int]]] = []
    for p in paths:
        sig = _stat_signature(p)
        if sig is None:
            skipped.append(Skipped(p, "file vanished"))
            continue
        rec = known.get(keys[p])
        if rec is not None and (rec.size, rec.mtime_ns, rec.inode) == sig:
            hashes[p] = rec.hash
        else:
            to_read.append((p, sig))

    def read(item: tuple[Path, tuple[int, int, int]]) -> str | OSError:
        try:
            return file_sha256(item[0])
        except OSError as e:
            return e

    fresh: list[FileRecord] = []
    for (p, sig), digest in ordered_map(read, to_read, workers or default_workers(), 64):
        if isinstance(digest, OSError):
            skipped.append(Skipped(p, f"cannot read ({digest.strerror or digest})"))
            continue
        hashes[p] = digest
        fresh.append(FileRecord(keys[p], sig[0], sig[1], sig[2], digest))
        if len(fresh) >= 500:
            store.put_file_records(fresh)
            fresh = []
    if fresh:
        store.put_file_records(fresh)
    return hashes, skipped, len(to_read)


def _prepare(embedder: Embedder, flip: bool = False) -> Callable[[Path], np.ndarray | ImageError]:
    side = embedder.input_side

    def prepare(path: Path) -> np.ndarray | ImageError:
        try:
            image = load_image(path, min_side=side)
            if flip:
                image = ImageOps.mirror(image)
            return embedder.preprocess([image])[0]
        except ImageError as e:
            return e
        except Exception as e:  # a processor failure on one odd image skips that image only
            return ImageError(f"cannot preprocess ({type(e).__name__}: {e})")

    return prepare


def embed_paths(
    store: Store,
    model: Model,
    paths: Iterable[Path],
    *,
    device: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    label: str = "Embedding",
    embedder: Embedder | None = None,
    flip: bool = False,
) -> EmbedResult:
    """Make sure every readable image in `paths` has a cached vector for `model`.

    Identical contents are embedded once. Unreadable files are listed in
    `skipped` with their reason; they are never modified or removed. With
    `flip`, the image is mirrored left-right before preprocessing and the vector
    goes to the separate flipped cache (test-time augmentation).
    """
    started = time.perf_counter()
    paths = list(dict.fromkeys(Path(p) for p in paths))
    workers = workers or default_workers()
    result = EmbedResult()
    hashes, result.skipped, result.hashed = hash_paths(store, paths, workers)
    cached = store.cached_hashes(model.id, hashes.values(), flipped=flip)
    todo: dict[str, Path] = {}
    for p, h in hashes.items():
        if h in cached:
            result.cached += 1
        else:
            todo.setdefault(h, p)
    bad: dict[str, str] = {}  # hash -> why it cannot be embedded
    if todo:
        embedder = embedder or get_embedder(model.name, model.path, model.embed_dim, device)
        batch_size = batch_size or default_batch_size(embedder)
        t0 = time.perf_counter()
        bar = tqdm(total=len(todo), desc=label, unit="img", disable=not progress_enabled(progress),
                   dynamic_ncols=True, smoothing=0.1)
        batch: list[tuple[str, np.ndarray]] = []

        def flush() -> None:
            pixels = np.stack([px for _, px in batch])
            vectors = embedder.embed_pixels(pixels)
            store.put_vectors(model.id, zip((h for h, _ in batch), vectors), flipped=flip)
            result.embedded += len(batch)
            bar.update(len(batch))
            batch.clear()

        depth = max(2 * batch_size, 4 * workers)
        prepare = _prepare(embedder, flip)
        for (h, _), prepared in ordered_map(lambda item: prepare(item[1]), todo.items(), workers, depth):
            if isinstance(prepared, ImageError):
                bad[h] = str(prepared)
                bar.update(1)
                continue
            batch.append((h, prepared))
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
        bar.close()
        result.embed_seconds = time.perf_counter() - t0
    for p, h in list(hashes.items()):
        if h in bad:
            result.skipped.append(Skipped(p, bad[h]))
            del hashes[p]
    result.hashes = hashes
    result.seconds = time.perf_counter() - started
    return result


def vectors_for(store: Store, model: Model, hashes: dict[Path, str], flipped: bool = False) -> dict[Path, np.ndarray]:
    """Cached vectors for the given path -> hash mapping (paths without a vector are left out)."""
    found = store.vectors(model.id, hashes.values(), flipped=flipped)
    return {p: found[h] for p, h in hashes.items() if h in found}
