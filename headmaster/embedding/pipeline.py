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
from contextlib import closing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
from PIL import ImageOps
from tqdm import tqdm

from headmaster.embedding.backends import backend_embedder, device_type as planned_device_type, uses_onnx
from headmaster.embedding.cores import CoreShare, cpu_cores
from headmaster.embedding.heap import keep_freed_memory, release_freed_memory
from headmaster.embedding.images import DECODER_VERSION, ImageError, ImageUnavailable, file_sha256, load_image
from headmaster.store import FileRecord, Model, Store


if TYPE_CHECKING:
    from headmaster.embedding.context import Context
    from headmaster.embedding.embedders import (Embedder)  # or headmaster.embedding.onnx.runtime.OrtEmbedder: the same interface

GIL_SWITCH_INTERVAL = 0.0005  # seconds, while embedding (measured in bench/RESULTS.md)

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
    load_seconds: float = 0.0  # loading the model (0 when nothing needed embedding or it was loaded already)
    first_batch_seconds: float = 0.0  # from the start of embedding to the first batch's vectors (pipeline fill)
    first_batch_images: int = 0
    batch_size: int = 0  # what the forward pass used (0: no forward pass)
    workers: int = 0  # decode workers used
    cpu_share: str = ""  # how the forward pass and the workers shared the CPU (headmaster.embedding.cores), "off" on a GPU
    backend: str = ""  # "torch" or "onnxruntime": what ran the forward pass ("" when nothing was embedded)

    def timings(self) -> dict:
        """Machine-readable numbers for benchmarks (`HEADMASTER_TIMINGS=1 hm embed`)."""
        torch = sys.modules.get("torch")  # the ONNX Runtime path never imports it
        return {"embedded": self.embedded, "cached": self.cached, "skipped": len(self.skipped),
                "hashed": self.hashed, "seconds": self.seconds, "embed_seconds": self.embed_seconds,
                "load_seconds": self.load_seconds, "images_per_second": self.images_per_second,
                "first_batch_seconds": self.first_batch_seconds, "first_batch_images": self.first_batch_images,
                "batch_size": self.batch_size, "workers": self.workers,
                "torch_threads": torch.get_num_threads() if torch else None,
                "cpu_share": self.cpu_share, "backend": self.backend,
                "peak_rss_mib": peak_rss_mib()}

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def summary(self, model_name: str) -> str:
        """One line: embedded, cached, skipped (when any), and the embedding rate when anything was embedded."""
        parts = [f"{self.cached} cached"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        rate = f", {self.images_per_second:.1f} img/s" if self.embedded else ""
        return (f"Embedded {self.embedded} images with {model_name} ({', '.join(parts)}) "
                f"in {self.seconds:.1f}s{rate}")


def peak_rss_mib() -> float | None:
    """This process's resident-memory high-water mark (Linux VmHWM; getrusage would include the parent's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def default_workers(device_type: str = "cpu") -> int:
    """Decode threads: one per core, at most 8 on a CPU (the forward pass needs the cores too); every core
    on a GPU, where decoding photos is the slow part and the forward pass needs almost no CPU."""
    cores = cpu_cores()
    return max(1, cores if device_type != "cpu" else min(8, cores))


def default_batch_size(embedder: "Embedder") -> int:
    return 64 if embedder.device.type in ("cuda", "mps") else 16


def progress_enabled(requested: bool | None) -> bool:
    """Progress bars only on a terminal unless asked for explicitly."""
    return sys.stderr.isatty() if requested is None else requested


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, depth: int,
                initializer: Callable[[], None] | None = None, name: str = "hm-decode") -> Iterator[tuple[T, R]]:
    """Like executor.map, but at most `depth` items in flight: memory stays flat.

    `items` is consumed lazily, one item per result handed out, so it may itself be a stream.
    """
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name, initializer=initializer) as pool:
        source = iter(items)
        pending = deque((item, pool.submit(fn, item)) for item in itertools.islice(source, max(1, depth)))
        while pending:
            item, future = pending.popleft()
            yield item, future.result()
            for nxt in itertools.islice(source, 1):  # refill once the consumer is done with the last one
                pending.append((nxt, pool.submit(fn, nxt)))


Signature = tuple[int, int, int]


@dataclass
class Scan:
    """Paths sorted by what the file index knows about them, without reading any file."""

    known: dict[Path, str]  # unchanged since last seen: path -> content hash
    to_read: list[tuple[Path, str, Signature]]  # new or changed: (path, its file-index key, stat signature)
    skipped: list[Skipped]
    cached: set[str]  # hashes among `known` that already have a vector for the model asked about


def index_key(path: Path) -> str:
    """A path's key in the file index: the absolute path, not resolved (as `Path.absolute` gives it)."""
    return str(path) if path.is_absolute() else str(path.absolute())


def _stat_all(keys: list[str]) -> list[Signature | None]:
    """(size, mtime_ns, inode) of each path, None where it is gone."""
    out: list[Signature | None] = []
    stat = os.stat
    for key in keys:
        try:
            st = stat(key)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_size, st.st_mtime_ns, st.st_ino))
    return out


def scan_paths(store: Store, paths: list[Path], model_id: int | None = None, flipped: bool = False) -> Scan:
    """Stat every path and look all of them up in the file index in bulk (this is all a re-run costs).

    With `model_id`, the same query tells which known contents already have a vector (`Scan.cached`).
    """
    keys = [index_key(p) for p in paths]
    records = store.file_signatures(keys, model_id, flipped)
    signatures = _stat_all(keys)
    scan = Scan({}, [], [], set())
    known, to_read, cached = scan.known, scan.to_read, scan.cached
    for p, key, sig in zip(paths, keys, signatures):
        if sig is None:
            scan.skipped.append(Skipped(p, "file vanished"))
            continue
        rec = records.get(key)
        if rec is not None and rec[:3] == sig:
            known[p] = rec[3]
            if rec[4]:
                cached.add(rec[3])
        else:
            to_read.append((p, key, sig))
    return scan


def stream_hashes(store: Store, scan: Scan, workers: int, depth: int = 64, share: CoreShare | None = None
                  ) -> Iterator[tuple[Path, str | Skipped]]:
    """Hash the new and changed files in worker threads (streamed in chunks), a bounded window ahead.

    Yields (path, hash) or (path, Skipped) in order; the file index is updated every 500 files and at the end.
    """
    share = share or CoreShare(False)

    def read_hash(item: tuple[Path, str, Signature]) -> str | OSError:
        with share.working():
            try:
                return file_sha256(item[0])
            except OSError as e:
                return e

    fresh: list[FileRecord] = []
    try:
        for (p, key, sig), digest in ordered_map(read_hash, scan.to_read, workers, depth, name="hm-hash"):
            if isinstance(digest, OSError):
                yield p, Skipped(p, f"cannot read ({digest.strerror or digest})")
                continue
            fresh.append(FileRecord(key, sig[0], sig[1], sig[2], digest))
            if len(fresh) >= 500:
                store.put_file_records(fresh)
                fresh = []
            yield p, digest
    finally:
        if fresh:
            store.put_file_records(fresh)


def hash_paths(store: Store, paths: list[Path], workers: int | None = None
               ) -> tuple[dict[Path, str], list[Skipped], int]:
    """Content hashes for `paths`; files whose size, mtime and inode match the index are not read.

    Returns (hashes, skipped, number of files actually read).
    """
    scan = scan_paths(store, paths)
    hashes, skipped = dict(scan.known), list(scan.skipped)
    for p, digest in stream_hashes(store, scan, workers or default_workers()):
        if isinstance(digest, Skipped):
            skipped.append(digest)
        else:
            hashes[p] = digest
    return {p: hashes[p] for p in paths if p in hashes}, skipped, len(scan.to_read)


def prepare_image(path: Path | str, side: int, preprocess: Callable[[list], np.ndarray], flip: bool = False,
                  max_pixels: int | None = None) -> np.ndarray | ImageError:
    """One file as the model's input array, or the ImageError saying why not: decoded no larger than needed
    (JPEG DCT scaling to at least `side`, the bomb guard on decoded pixels with `max_pixels`), then the model's
    own preprocessing. The Ray engine's decode tasks call this too, so both engines feed the model the same
    arrays."""
    try:
        image = load_image(path, min_side=side, max_pixels=max_pixels)
        if flip:
            image = ImageOps.mirror(image)
        return preprocess([image])[0]
    except ImageError as e:
        return e
    except Exception as e:  # a processor failure on one odd image skips that image only
        return ImageError(f"cannot preprocess ({type(e).__name__}: {e})")


def _prepare(embedder: "Embedder", share: CoreShare, flip: bool = False, max_pixels: int | None = None
             ) -> Callable[[Path], np.ndarray | ImageError]:
    """prepare_image with the embedder's input side and processor, taking turns with the forward pass."""
    side = embedder.input_side

    def prepare(path: Path) -> np.ndarray | ImageError:
        with share.working():
            return prepare_image(path, side, embedder.preprocess, flip, max_pixels)

    return prepare


def worker_setup() -> None:
    """File workers use one intra-op thread each (the processor runs torch ops): they are many already."""
    torch = sys.modules.get("torch")  # not loaded on the ONNX Runtime path, whose preprocessing is numpy
    if torch is not None:
        torch.set_num_threads(1)  # per thread: OpenMP's setting is thread-local


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
    embedder: "Embedder | None" = None,
    cpu_share: str = "auto",
    flip: bool = False,
    backend: str | None = None,
    max_pixels: int | None = None,
) -> EmbedResult:
    """Make sure every readable image in `paths` has a cached vector for `model`.

    One stream: stat against the file index (unchanged files are never read) -> hash new files in
    threads -> cache look-up -> decode and preprocess in threads -> batched forward pass -> vectors to
    SQLite per batch. Every stage is a bounded window ahead of the next, so memory stays flat however
    many files there are. Identical contents are embedded once. Unreadable files are listed in
    `skipped` with their reason; they are never modified or removed. With `flip`, the image is
    mirrored left-right before preprocessing and the vector goes to the separate flipped cache
    (test-time augmentation).

    On the CPU the forward pass and the file workers share the cores as `cpu_share` says: "auto"
    measures both ways of headmaster.embedding.cores on the first batches and keeps the faster, "turns" or
    "split" forces one, "off" lets them overlap freely (as on a GPU).

    `backend` ("auto", "torch", "onnxruntime"; None: "auto") picks the engine of the forward pass
    (headmaster.embedding.backends); the vectors are the same either way and cached under the same model.
    `max_pixels` is the decompression-bomb limit on decoded pixels (None: images.MAX_IMAGE_PIXELS).
    """
    started = time.perf_counter()
    paths = list(dict.fromkeys(p if isinstance(p, Path) else Path(p) for p in paths))
    device_type = embedder.device.type if embedder else planned_device_type(backend, device)
    onnx_planned = getattr(embedder, "backend", "torch") == "onnxruntime" if embedder else uses_onnx(backend, device)
    workers = workers or default_workers(device_type)
    result = EmbedResult(workers=workers)
    scan = scan_paths(store, paths, model.id, flip)
    result.skipped, result.hashed = list(scan.skipped), len(scan.to_read)
    cached = scan.cached
    hashes: dict[Path, str] = {}
    queued: set[str] = set()
    gate = CoreShare(device_type == "cpu" and cpu_share != "off",
                     mode=None if cpu_share in ("auto", "off") else cpu_share, torch_threads=not onnx_planned)

    # hash -> why it cannot be embedded; contents that failed before are skipped without loading the model
    bad: dict[str, str] = store.unusable(model.id, {h for h in scan.known.values() if h not in cached},
                                         DECODER_VERSION)
    found_bad: list[tuple[str, str]] = []  # failures of this run that are about the content: remembered

    def todo() -> Iterator[tuple[str, Path]]:
        """Unique contents without a cached vector, known files first, new files as they are hashed."""
        for p, h in scan.known.items():
            hashes[p] = h
            if h in cached:
                result.cached += 1
            elif h not in queued and h not in bad:
                queued.add(h)
                yield h, p
        hashed = stream_hashes(store, scan, workers, share=gate)
        with closing(hashed):  # its `finally` writes the file index while the store is still open
            for p, h in hashed:
                if isinstance(h, Skipped):
                    result.skipped.append(h)
                    continue
                hashes[p] = h
                if h in cached or (h not in queued and store.cached_hashes(model.id, [h], flipped=flip)):
                    cached.add(h)
                    result.cached += 1
                elif h in queued or h in bad:
                    continue
                elif reason := store.unusable(model.id, [h], DECODER_VERSION).get(h):
                    bad[h] = reason
                else:
                    queued.add(h)
                    yield h, p

    stream = todo()
    try:  # on any exit, stop the hashing and decoding threads now, not when the generators are collected
        first = next(stream, None)
        if first is not None:
            if device_type == "cpu":
                keep_freed_memory()  # activations are reused from batch to batch instead of faulted in anew
            t_load = time.perf_counter()
            embedder = embedder or backend_embedder(model, backend, device)
            result.backend = getattr(embedder, "backend", "torch")
            batch_size = batch_size or default_batch_size(embedder)
            t0 = time.perf_counter()
            result.load_seconds, result.batch_size = t0 - t_load, batch_size
            estimate = sum(1 for h in set(scan.known.values()) if h not in cached and h not in bad) \
                + len(scan.to_read)
            bar = tqdm(total=estimate, desc=label, unit="img", disable=not progress_enabled(progress),
                       dynamic_ncols=True, smoothing=0.1)
            batch: list[tuple[str, np.ndarray]] = []

            def flush() -> None:
                pixels = np.stack([px for _, px in batch])
                with gate.forward(len(batch)):
                    vectors = embedder.embed_pixels(pixels)
                store.put_vectors(model.id, zip((h for h, _ in batch), vectors), flipped=flip)
                if not result.embedded:
                    result.first_batch_seconds, result.first_batch_images = time.perf_counter() - t0, len(batch)
                result.embedded += len(batch)
                bar.update(len(batch))
                batch.clear()

            depth = max(2 * batch_size, 4 * workers)
            prepare = _prepare(embedder, gate, flip, max_pixels)
            decoded = ordered_map(lambda item: prepare(item[1]), itertools.chain([first], stream), workers, depth,
                                  initializer=worker_setup)
            # The forward thread needs the GIL for a moment between torch ops; with Python's default 5 ms
            # switch interval a decode thread in Python code holds it long enough to stall the forward pass.
            switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(switch_interval, GIL_SWITCH_INTERVAL))
            try:
                for (h, _), prepared in decoded:
                    if isinstance(prepared, ImageError):
                        bad[h] = str(prepared)
                        if not isinstance(prepared, ImageUnavailable):
                            found_bad.append((h, str(prepared)))
                        bar.update(1)
                        continue
                    batch.append((h, prepared))
                    if len(batch) >= batch_size:
                        flush()
                if batch:
                    flush()
            finally:
                decoded.close()
                store.put_unusable(model.id, found_bad, DECODER_VERSION)
                sys.setswitchinterval(switch_interval)
                gate.close()
                bar.total = bar.n  # duplicates and cached contents among new files were never queued
                bar.close()
            result.cpu_share = gate.chosen if gate.enabled else "off"
            result.embed_seconds = time.perf_counter() - t0
    finally:
        stream.close()
        release_freed_memory()
    if bad:
        for p, h in list(hashes.items()):
            if h in bad:
                result.skipped.append(Skipped(p, bad[h]))
                del hashes[p]
    result.hashes = hashes if len(hashes) == len(paths) else {p: hashes[p] for p in paths if p in hashes}
    result.seconds = time.perf_counter() - started
    return result



def warm_embedder(model: Model, *, device: str | None = None, backend: str | None = None) -> "Embedder":
    """Load `model`'s embedder as `embed_paths` will (the same cache of loaded models and ONNX sessions) and put
    one blank image through it, so the first real batch pays neither the load nor the first run's set-up.
    hmd's worker does this while new files are still settling (headmaster/daemon/worker.py, `warm`)."""
    from PIL import Image

    embedder = backend_embedder(model, backend, device)
    side = embedder.input_side
    embedder.embed_pixels(embedder.preprocess([Image.new("RGB", (side, side))]))
    return embedder


def embed_for(ctx: "Context", model: Model, paths: Iterable[Path], label: str = "Embedding",
              **kwargs: Any) -> EmbedResult:
    """`embed_paths` with the command's options (device, batch size, workers, progress) from `ctx`."""
    o = ctx.options
    kwargs.setdefault("backend", o.backend)
    kwargs.setdefault("max_pixels", o.max_pixels)
    return embed_paths(ctx.store, model, paths, device=o.device, batch_size=o.batch_size, workers=o.workers,
                       progress=o.progress, label=label, **kwargs)


def vectors_for(store: Store, model: Model, hashes: dict[Path, str], flipped: bool = False
                ) -> dict[Path, np.ndarray]:
    """Cached vectors for the given path -> hash mapping (paths without a vector are left out)."""
    found = store.vectors(model.id, hashes.values(), flipped=flipped)
    return {p: found[h] for p, h in hashes.items() if h in found}
