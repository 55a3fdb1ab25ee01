"""What every command needs: the workspace, its database and the embedding options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from headmaster.store import Model, Store
from headmaster.workspace import Workspace


@dataclass
class EmbedOptions:
    device: str | None = None  # None: cuda, then mps, then cpu
    batch_size: int | None = None  # None: chosen for the device
    workers: int | None = None  # None: one decode thread per core, at most 8
    progress: bool | None = None  # None: a bar only when stderr is a terminal
    backend: str | None = None  # auto, torch or onnxruntime (headmaster.embedding.backends); None: auto
    max_pixels: int | None = None  # decoded pixels per image ([embedding] max_pixels); None: images.MAX_IMAGE_PIXELS


@dataclass
class Context:
    workspace: Workspace
    store: Store
    options: EmbedOptions
    notify: Callable[[str], None] | None = None  # one-off notices (the built-in model being prepared)

    @classmethod
    def open(cls, workspace: str | None = None, options: EmbedOptions | None = None,
             notify: Callable[[str], None] | None = None) -> "Context":
        ws = Workspace.from_env(workspace)
        return cls(ws, Store(ws.db_path), options or EmbedOptions(), notify)

    def active_model(self) -> Model:
        """The model to embed with; the built-in one when none is registered (registry.model_in_use)."""
        from headmaster.embedding.registry import model_in_use

        return model_in_use(self.store, self.notify)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
