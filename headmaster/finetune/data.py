"""The heads' images for fine-tuning: decoded, lightly augmented, and run once through the frozen trunk.

Only the last blocks of the backbone are adapted, so everything before them
gives the same output every epoch. `Trunk` computes that output once per image
view (the plain view as `hm embed` sees it, plus a few augmented views: random
resized crop, horizontal flip) and later replays it into the adapted blocks,
so an epoch costs only the last blocks' forward and backward pass.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from headmaster import HeadmasterError
from headmaster.embedding import (Embedder, ImageError, default_workers, load_image, ordered_map, progress_enabled,
                                  worker_setup)
from headmaster.finetune.targets import AdaptRule, blocks_of, split_index

CROP_SCALE = (0.35, 1.0)  # share of the image area a random crop keeps
CROP_RATIO = (3 / 4, 4 / 3)
STAND_IN_SIDE = 32  # input side fed to a stem that accepts any size while replaying (its output is replaced)


def random_resized_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random part of the image (area and aspect ratio drawn as usual); the processor resizes it after."""
    w, h = image.size
    for _ in range(10):
        area = w * h * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return image.crop((x, y, x + cw, y + ch))
    return image


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    image = random_resized_crop(image, rng)
    return ImageOps.mirror(image) if rng.random() < 0.5 else image


def view_rng(content_hash: str) -> np.random.Generator:
    """An image's augmented views depend on its content only (not on the run's seed or the order of work),
    so computed views stay valid for every later run on the same base and split point."""
    return np.random.default_rng(int(content_hash[:15], 16))


class _Stop(Exception):
    """Raised by the capture hook: nothing after the split needs computing."""


@dataclass
class Trunk:
    """The frozen blocks before the split point of one loaded backbone."""

    embedder: Embedder
    rule: AdaptRule
    split: int  # index of the first adapted block

    @classmethod
    def of(cls, embedder: Embedder, rule: AdaptRule, adapt_blocks: int) -> "Trunk":
        return cls(embedder, rule, split_index(embedder.model, rule, adapt_blocks))

    def _parent_and_attr(self) -> tuple[Any, str]:
        parent = self.embedder.model
        *path, attr = self.rule.blocks.split(".")
        for part in path:
            parent = getattr(parent, part)
        return parent, attr

    @torch.no_grad()
    def capture(self, pixels: torch.Tensor) -> torch.Tensor:
        """The input of the first adapted block for these pixels (what the frozen part computes)."""
        seen: list[torch.Tensor] = []

        def hook(module, args, kwargs):
            seen.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop

        handle = blocks_of(self.embedder.model, self.rule)[self.split].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.embedder.rule.extract(self.embedder.model, self.embedder.place(pixels))
        except _Stop:
            pass
        finally:
            handle.remove()
        return seen[0].detach()

    @contextmanager
    def replaying(self) -> Iterator["Replay"]:
        """Within: `replay(activations)` runs only the adapted blocks and what follows them."""
        parent, attr = self._parent_and_attr()
        blocks = getattr(parent, attr)
        fed: list[torch.Tensor] = []

        def hook(module, args, kwargs):
            if args:
                return (fed[0], *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fed[0]}

        tail = blocks[self.split:]
        handle = tail[0].register_forward_pre_hook(hook, with_kwargs=True)
        setattr(parent, attr, tail)
        try:
            yield Replay(self, fed)
        finally:
            handle.remove()
            setattr(parent, attr, blocks)

    def values_per_view(self) -> int:
        """Size of one view's activations (numbers), from a blank image of the model's input size."""
        from headmaster.embedding import probe_size

        return int(self.capture(torch.zeros((1, 3, *probe_size(self.embedder.processor)))).numel())

    def stand_in(self, batch: int) -> torch.Tensor:
        """Pixels for the stem while replaying: its output is thrown away, so as small as the stem allows."""
        from headmaster.embedding import probe_size

        h, w = (STAND_IN_SIDE, STAND_IN_SIDE) if self.rule.any_size else probe_size(self.embedder.processor)
        return self.embedder.place(torch.zeros((batch, 3, h, w)))


@dataclass
class Replay:
    trunk: Trunk
    fed: list[torch.Tensor]

    def __call__(self, activations: torch.Tensor) -> torch.Tensor:
        """Backbone vectors (the embedding rule's output) for trunk activations."""
        e = self.trunk.embedder
        self.fed[:] = [e.place(activations)]
        try:
            return e.rule.extract(e.model, self.trunk.stand_in(len(activations)))
        finally:
            self.fed.clear()


@dataclass
class ViewCache:
    """Trunk activations per content hash: the plain view (float32) and augmented views (float16)."""

    plain: dict[str, torch.Tensor] = field(default_factory=dict)
    augmented: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # hash -> why the image could not be used
    seconds: float = 0.0
    views: int = 0  # views computed

    def batch(self, hashes: list[str], rng: np.random.Generator | None = None) -> torch.Tensor:
        """Stacked activations: one random view per image with `rng`, else the plain views."""
        if rng is None:
            return torch.stack([self.plain[h] for h in hashes])
        out = []
        for h in hashes:
            choices = [self.plain[h], *self.augmented.get(h, [])]
            out.append(choices[int(rng.integers(len(choices)))].float())
        return torch.stack(out)


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def views_that_fit(wanted: int, values: int, images: int, train_images: int, memory_gb: float) -> int:
    """How many augmented views per training image fit in `memory_gb` beside every image's plain view
    (plain views kept in float32, augmented ones in float16, as ViewCache holds them)."""
    budget = memory_gb * 2**30
    plain = images * values * 4
    if plain > budget:
        raise HeadmasterError(f"the frozen blocks' activations of {images} images need {_size(plain)}, "
                              f"more than --memory-gb {memory_gb:g}: raise it, or fine-tune for fewer images")
    if wanted == 0 or train_images == 0:
        return wanted
    return max(0, min(wanted, int((budget - plain) // (train_images * values * 2))))


def fill_views(cache: ViewCache, trunk: Trunk, items: list[tuple[str, Path, int]], *, batch_size: int = 32, workers: int | None = None, progress: bool | None = None) -> ViewCache:
    """Compute trunk activations for (hash, path, augmented views wanted) items not in `cache` yet.

    Decoding and augmentation run in worker threads a bounded window ahead of the trunk's forward pass.
    """
    e = trunk.embedder
    todo = [(h, p, n) for h, p, n in items if h not in cache.plain and h not in cache.failed]
    if not todo:
        return cache
    side = e.input_side

    def decode(item: tuple[str, Path, int]) -> list[np.ndarray] | ImageError:
        h, path, n_aug = item
        try:
            image = load_image(path, min_side=side)
            rng = view_rng(h)
            return [e.preprocess([image])[0], *(e.preprocess([augment(image, rng)])[0] for _ in range(n_aug))]
        except ImageError as err:
            return err
        except Exception as err:  # a processor failure on one odd image skips that image only
            return ImageError(f"cannot preprocess ({type(err).__name__}: {err})")

    started = time.perf_counter()
    workers = workers or default_workers(e.device.type)
    total = sum(1 + n for _, _, n in todo)
    bar = tqdm(total=total, desc="Trunk pass (once)", unit="view", disable=not progress_enabled(progress),
               dynamic_ncols=True)
    pending: list[tuple[str, int, np.ndarray]] = []  # (hash, view index, pixels)

    def flush() -> None:
        acts = trunk.capture(torch.as_tensor(np.stack([px for _, _, px in pending]))).float().cpu()
        for (h, view, _), act in zip(pending, acts):
            if view == 0:
                cache.plain[h] = act.clone()
            else:
                cache.augmented.setdefault(h, []).append(act.half())
        cache.views += len(pending)
        bar.update(len(pending))
        pending.clear()

    try:
        for (h, _, n_aug), decoded in ordered_map(decode, todo, workers, max(2 * batch_size, 4 * workers),
                                                  initializer=worker_setup):
            if isinstance(decoded, ImageError):
                cache.failed[h] = str(decoded)
                bar.update(1 + n_aug)
                continue
            pending.extend((h, i, px) for i, px in enumerate(decoded))
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()
    finally:
        bar.close()
    cache.seconds += time.perf_counter() - started
    return cache
