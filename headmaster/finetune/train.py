"""LP-FT: linear probing on frozen vectors, then LoRA adapters and heads trained together.

Stage 1 trains each head on the active model's cached vectors (`hm train`).
Stage 2 adds LoRA adapters to the last blocks of the backbone and trains them
with the heads (one loss per head, summed) on the heads' training images, keeping
the epoch with the best mean validation accuracy. Epoch 0 is the frozen model
itself, so "best" means "better than the frozen heads" or nothing. A head's
validation images are never trained on, by any head. The result is written as an
adapter folder and registered as a model; when it wins (or --activate), it
becomes the active model and the heads are retrained on its vectors.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from headmaster import HeadmasterError
from headmaster.embedding import (Context, Embedder, activate_model, add_adapters, add_model, load_embedder,
                                  progress_enabled)
from headmaster.finetune.adapters import write_adapter_folder
from headmaster.finetune.data import Trunk, ViewCache, fill_views, views_that_fit
from headmaster.finetune.targets import adapt_rule, blocks_of, lora_targets
from headmaster.heads import (HeadMLP, TrainConfig, TrainReport, class_weights, head_from_checkpoint, labelled_rows,
                              read_checkpoint, save_checkpoint, train_one, training_split)
from headmaster.store import Model


@dataclass(frozen=True)
class FinetuneConfig:
    rank: int = 8
    alpha: float = 16.0
    lp_epochs: int = 50  # stage 1 (and the retrain after), as `hm train --epochs`
    ft_epochs: int | None = None  # stage 2; None: 6 on a CPU, 10 on a GPU
    blocks: int | None = None  # adapted blocks (the last ones); None: 2 on a CPU, a third of them on a GPU
    views: int | None = None  # augmented views per training image, computed once; None: 4 on a CPU, 8 on a GPU
    lr: float = 1e-3  # adapters
    head_lr: float = 1e-4  # heads, already trained by stage 1
    batch_size: int = 32
    seed: int = 0
    memory_gb: float = 4.0  # for the cached activations of the frozen blocks (fewer views when they would not fit)

    def resolved(self, device: torch.device, n_blocks: int) -> "FinetuneConfig":
        gpu = device.type != "cpu"
        return FinetuneConfig(
            **{**asdict(self),
               "ft_epochs": self.ft_epochs or (10 if gpu else 6),
               "blocks": self.blocks or min(n_blocks, max(2, n_blocks // 3) if gpu else 2),
               "views": self.views if self.views is not None else (8 if gpu else 4)})


@dataclass
class HeadTask:
    """One head's images, labels and split, and its module being trained."""

    name: str
    classes: list[str]
    hashes: list[str]
    labels: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    module: HeadMLP
    weights: torch.Tensor
    threshold: float  # binary: stage 1's threshold on P(classes[1]), so epoch 0 scores what `hm train` reported
    checkpoint: dict  # stage 1's checkpoint, put back if the fine-tuned model is not kept
    frozen_accuracy: float = 0.0
    best_accuracy: float = 0.0

    def __post_init__(self) -> None:
        self.train_labels = {self.hashes[i]: int(self.labels[i]) for i in self.train_idx}

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The heads' own weighted loss (heads._fit): BCE for binary, cross-entropy otherwise."""
        if self.binary:
            raw = nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.float(), reduction="none")
        else:
            raw = nn.functional.cross_entropy(logits, y, reduction="none")
        w = self.weights[y]
        return (raw * w).sum() / w.sum().clamp_min(1e-12)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(logits[:, 0]) >= self.threshold).long() if self.binary else logits.argmax(dim=1)


@dataclass
class EpochRecord:
    epoch: int
    val_accuracy: float  # mean over heads
    val_loss: float  # sum over heads, each head's own weighted loss
    per_head: dict[str, float]
    seconds: float
    images_per_second: float
    loss: float | None = None  # training loss, mean over the epoch's steps

    def beats(self, other: "EpochRecord") -> bool:
        """Higher validation accuracy, ties to the lower validation loss (as heads pick their best epoch)."""
        return (self.val_accuracy, -self.val_loss) > (other.val_accuracy, -other.val_loss)


@dataclass
class FinetuneReport:
    name: str
    base: Model
    folder: Path
    config: FinetuneConfig
    lp: list[TrainReport]
    epochs: list[EpochRecord]
    best_epoch: int
    frozen_accuracy: float
    best_accuracy: float
    improved: bool
    activated: bool
    interrupted: bool
    train_images: int
    val_images: int
    trunk_seconds: float
    ft_seconds: float
    retrained: list[TrainReport] = field(default_factory=list)
    reverted: tuple[float, float] | None = None  # (frozen, retrained) mean accuracy when the retrained heads lost
    skipped: dict[str, str] = field(default_factory=dict)  # hash -> reason


class StopRequest:
    """Ctrl-C asks to stop after the current step; a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def listening(self) -> Iterator["StopRequest"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def default_name(base: str, heads: list[str]) -> str:
    return f"{base}-ft-{'-'.join(heads)}"


def finetune(ctx: Context, heads: list[str], name: str | None = None, config: FinetuneConfig = FinetuneConfig(),
             activate: bool = False, views: ViewCache | None = None,
             stop: StopRequest | None = None, say: Callable[[str], None] = lambda s: None) -> FinetuneReport:
    """LP-FT over `heads` on the active model; writes <workspace>/models/NAME/ and registers it as NAME.

    `views` may hold trunk activations from an earlier run on the same base, blocks and seed (benchmarks
    reuse them); `say` receives one line per stage.
    """
    if not heads:
        raise HeadmasterError("--heads needs at least one head")
    heads = list(dict.fromkeys(heads))
    for h in heads:
        ctx.workspace.head(h)  # unknown heads fail before any work
    base = ctx.store.active_model()
    name = name or default_name(base.name, heads)
    if any(m.name == name for m in ctx.store.models()):
        raise HeadmasterError(f"model '{name}' is already registered: choose another --name or "
                              f"`hm model-remove --name {name}`")
    folder = ctx.workspace.root / "models" / name
    if folder.exists():
        raise HeadmasterError(f"{folder} already exists: choose another --name or remove that folder")
    stop = stop or StopRequest()
    progress = progress_enabled(ctx.options.progress)

    # stage 1: linear probing, exactly `hm train`
    lp_config = TrainConfig(epochs=config.lp_epochs, seed=config.seed, kind="mlp")
    lp = [train_one(ctx, h, lp_config) for h in heads]
    say("Stage 1 (frozen backbone): " + ", ".join(f"{r.head} accuracy {r.metrics['accuracy']:.3f}" for r in lp))

    embedder = load_embedder(base.name, base.path, base.embed_dim, ctx.options.device)
    embedder.model.float()  # adapters train in full precision, also where inference runs in half
    embedder.dtype = torch.float32
    rule = adapt_rule(embedder.model)
    config = config.resolved(embedder.device, len(blocks_of(embedder.model, rule)))
    tasks, paths = _tasks(ctx, base, heads, lp, lp_config)
    val_hashes = {t.hashes[i] for t in tasks for i in t.val_idx}
    train_hashes = sorted({t.hashes[i] for t in tasks for i in t.train_idx} - val_hashes)

    trunk = Trunk.of(embedder, rule, config.blocks)
    views = views if views is not None else ViewCache()
    if not train_hashes:
        raise HeadmasterError("no training images left once every head's validation images are set apart: "
                              "add images (each bucket needs at least 2)")
    wanted = set(train_hashes)
    fit = views_that_fit(config.views, trunk.values_per_view(), len(paths), len(wanted), config.memory_gb)
    if fit < config.views:
        say(f"Augmented views: {fit} per training image instead of {config.views}, so that the activations "
            f"fit in --memory-gb {config.memory_gb:g}")
        config = replace(config, views=fit)
    items = [(h, paths[h], config.views if h in wanted else 0) for h in sorted(paths)]
    t0 = time.perf_counter()
    fill_views(views, trunk, items, batch_size=config.batch_size, workers=ctx.options.workers,
               progress=ctx.options.progress)
    trunk_seconds = time.perf_counter() - t0
    train_hashes = [h for h in train_hashes if h in views.plain]
    say(f"Trunk pass: {views.views} views of {len(views.plain)} images in {trunk_seconds:.1f}s "
        f"(blocks before {rule.blocks}.{trunk.split} run once; the last {config.blocks} are adapted)")

    targets = lora_targets(embedder.model, rule, config.blocks)
    torch.manual_seed(config.seed)
    lora = add_adapters(embedder.model, config.rank, config.alpha, targets, embedder.memory_format)
    embedder.model.eval()  # batch norm keeps its statistics; only the heads use dropout
    optimiser = torch.optim.AdamW([
        {"params": list(lora.values()), "lr": config.lr, "weight_decay": 0.0},
        {"params": [p for t in tasks for p in t.module.parameters()], "lr": config.head_lr, "weight_decay": 0.0},
    ])
    steps = config.ft_epochs * max(1, math.ceil(len(train_hashes) / config.batch_size))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))

    def snapshot() -> dict[str, dict[str, torch.Tensor]]:
        return {"lora": {k: v.detach().clone() for k, v in lora.items()},
                **{f"head:{t.name}": {k: v.detach().clone() for k, v in t.module.state_dict().items()} for t in tasks}}

    rng = np.random.default_rng(config.seed)
    epochs: list[EpochRecord] = []
    interrupted = False
    t_ft = time.perf_counter()
    with trunk.replaying() as replay, stop.listening():
        first = _validate(replay, views, tasks, 0, 0.0, 0)
        epochs.append(first)
        for t in tasks:
            t.frozen_accuracy = t.best_accuracy = first.per_head[t.name]
        best, best_state = first, snapshot()
        say(f"Epoch 0 (frozen backbone, stage 1 heads): validation accuracy {first.val_accuracy:.3f} "
            f"(loss {first.val_loss:.3f})")
        for epoch in range(1, config.ft_epochs + 1):
            started, losses, seen = time.perf_counter(), [], 0
            order = [train_hashes[i] for i in rng.permutation(len(train_hashes))]
            bar = tqdm(total=len(order), desc=f"Fine-tune {epoch}/{config.ft_epochs}", unit="img",
                       disable=not progress, dynamic_ncols=True)
            for t in tasks:
                t.module.train()
            for start in range(0, len(order), config.batch_size):
                batch = order[start:start + config.batch_size]
                features = replay(views.batch(batch, rng))
                loss = _joint_loss(features, batch, tasks)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                losses.append(float(loss.detach()))
                seen += len(batch)
                bar.update(len(batch))
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", val=f"{best.val_accuracy:.3f}")
                if stop.requested:
                    break
            bar.close()
            if stop.requested and seen < len(order):
                interrupted = True
                say(f"Stopped during epoch {epoch}: keeping the best finished epoch ({best.epoch})")
                break
            record = _validate(replay, views, tasks, epoch, time.perf_counter() - started, seen,
                               float(np.mean(losses)) if losses else None)
            epochs.append(record)
            mark = ""
            if record.beats(best):
                best, best_state, mark = record, snapshot(), " (best so far)"
                for t in tasks:
                    t.best_accuracy = record.per_head[t.name]
            say(f"Epoch {epoch}: validation accuracy {record.val_accuracy:.3f} (loss {record.val_loss:.3f}), "
                f"training loss {record.loss:.3f}, "
                f"{record.images_per_second:.1f} img/s{mark}")
            if stop.requested:
                interrupted = True
                say(f"Stopped after epoch {epoch}: keeping the best epoch ({best.epoch})")
                break
        ft_seconds = time.perf_counter() - t_ft
        with torch.no_grad():
            for k, v in best_state["lora"].items():
                lora[k].copy_(v)
        improved = best.val_accuracy > first.val_accuracy  # a tie (lower loss only) is no reason to switch models
        # the fine-tuned model's vectors for every image seen: the plain view through the adapted blocks
        fresh = _vectors(replay, views, sorted(views.plain))

    record = {
        "base": {"name": base.name, "path": base.path, "dim": base.embed_dim},
        "lora": {"rank": config.rank, "alpha": config.alpha, "targets": targets, "blocks": config.blocks,
                 "split": f"{rule.blocks}.{trunk.split}", "rule": rule.name},
        "heads": {t.name: {"classes": t.classes, "images": len(t.hashes), "train": int(len(t.train_idx)),
                           "validation": int(len(t.val_idx)), "frozen_accuracy": t.frozen_accuracy,
                           "finetuned_accuracy": t.best_accuracy} for t in tasks},
        "images": {"train": len(train_hashes), "validation": len(val_hashes), "augmented_views": config.views},
        "epochs": [asdict(e) for e in epochs],
        "best_epoch": best.epoch,
        "interrupted": interrupted,
        "config": asdict(config),
        "device": str(embedder.device),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_adapter_folder(folder, lora, record)
    model = add_model(ctx.store, name, str(folder), base.embed_dim)
    ctx.store.put_vectors(model.id, fresh.items())

    report = FinetuneReport(name, base, folder, config, lp, epochs, best.epoch, first.val_accuracy,
                            best.val_accuracy, improved, False, interrupted, len(train_hashes), len(val_hashes),
                            trunk_seconds, ft_seconds, skipped=dict(views.failed))
    if improved or activate:
        frozen_heads = {t.name: t.checkpoint for t in tasks}
        activate_model(ctx.store, name)
        report.activated = True
        report.retrained = [train_one(ctx, h, lp_config) for h in heads]
        if not activate:
            keep_if_retrained_heads_win(ctx, report, frozen_heads)
    return report


def keep_if_retrained_heads_win(ctx: Context, report: FinetuneReport, frozen_heads: dict[str, dict]) -> bool:
    """The joint heads won; what the user keeps are heads retrained on the new vectors, scored on the same
    validation images as stage 1's. Unless they beat the frozen heads too, the base model and the frozen
    heads' checkpoints come back. Returns whether the fine-tuned model stays active."""
    retrained = float(np.mean([r.metrics["accuracy"] for r in report.retrained]))
    frozen = float(np.mean([r.metrics["accuracy"] for r in report.lp]))
    if retrained > frozen:
        return True
    for head, checkpoint in frozen_heads.items():
        save_checkpoint(checkpoint, ctx.workspace.checkpoint_path(head))  # its numpy copy too
    activate_model(ctx.store, report.base.name)
    report.activated, report.improved, report.reverted = False, False, (frozen, retrained)
    return False


def _tasks(ctx: Context, base: Model, heads: list[str], lp: list[TrainReport], lp_config: TrainConfig
           ) -> tuple[list[HeadTask], dict[str, Path]]:
    """Each head's images in training order (so its split is stage 1's split), its LP module; hash -> a path."""
    tasks, paths = [], {}
    for head, report in zip(heads, lp):
        labelled = ctx.workspace.head(head)
        _, labels, _, head_paths = labelled_rows(ctx, base, labelled, report.embed)
        labels = np.asarray(labels, dtype=np.int64)
        hashes = [report.embed.hashes[p] for p in head_paths]
        for h, p in zip(hashes, head_paths):
            paths.setdefault(h, p)
        train_idx, val_idx, _ = training_split(head, len(labelled.classes), labels, lp_config)
        checkpoint = read_checkpoint(report.checkpoint_path)
        trained = head_from_checkpoint(checkpoint)  # the module gets its own copy of the weights
        weights = torch.as_tensor(class_weights(labels[train_idx], len(labelled.classes)))
        tasks.append(HeadTask(head, labelled.classes, hashes, labels, train_idx, val_idx, trained.module, weights,
                              trained.threshold if trained.threshold is not None else 0.5, checkpoint))
    return tasks, paths


def _joint_loss(features: torch.Tensor, batch: list[str], tasks: list[HeadTask]) -> torch.Tensor:
    """Sum over heads of each head's loss on the batch images it labels (for training)."""
    total = features.new_zeros(())
    for t in tasks:
        rows = [j for j, h in enumerate(batch) if h in t.train_labels]
        if rows:
            y = torch.as_tensor([t.train_labels[batch[j]] for j in rows])
            total = total + t.loss(t.module(features[rows].float().cpu()), y)
    return total


@torch.no_grad()
def _vectors(replay, views: ViewCache, hashes: list[str], batch_size: int = 64) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for start in range(0, len(hashes), batch_size):
        part = hashes[start:start + batch_size]
        out.update(zip(part, replay(views.batch(part)).float().cpu().numpy()))
    return out


@torch.no_grad()
def _validate(replay, views: ViewCache, tasks: list[HeadTask], epoch: int, seconds: float, seen: int,
              loss: float | None = None) -> EpochRecord:
    """Accuracy of every head on its own validation images (plain views), and their mean."""
    wanted = sorted({t.hashes[i] for t in tasks for i in t.val_idx if t.hashes[i] in views.plain})
    vectors = _vectors(replay, views, wanted)
    per_head, val_loss = {}, 0.0
    for t in tasks:
        keep = [i for i in t.val_idx if t.hashes[i] in vectors]
        t.module.eval()
        logits = t.module(torch.as_tensor(np.stack([vectors[t.hashes[i]] for i in keep])))
        per_head[t.name] = float((t.predict(logits).numpy() == t.labels[keep]).mean())
        val_loss += float(t.loss(logits, torch.as_tensor(t.labels[keep])))
    return EpochRecord(epoch, float(np.mean(list(per_head.values()))), val_loss, per_head, seconds,
                       seen / seconds if seconds > 0 else 0.0, loss)
