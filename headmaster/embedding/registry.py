"""The model registry commands: model-add, model-activate, model-list, model-remove."""

from __future__ import annotations

import os
from typing import Callable

from headmaster import HeadmasterError
from headmaster.embedding.builtin import ensure_default_model
from headmaster.store import Model, Store


def normalise_model_path(path: str) -> str:
    """Local folders are stored as absolute paths (so any working directory works); hub ids as given."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    if path.startswith((".", "/", "~")):
        raise HeadmasterError(f"model folder not found: {path}")
    return path


def add_model(store: Store, name: str, path: str, dim: int | None = None) -> Model:
    """Register a model; the first one registered becomes the active one.

    The model is loaded once and embeds one blank image: its vector size is learned when `dim` is None and
    checked when given, so a wrong --dim or an unloadable model is refused here, not at the first embed.
    """
    if any(m.name == name for m in store.models()):
        raise HeadmasterError(f"model '{name}' is already registered")
    path = normalise_model_path(path)
    found = probe_dim(name, path)
    if dim is not None and dim != found:
        raise HeadmasterError(f"model '{name}' produces {found}-dimensional vectors, not --dim {dim}: "
                              f"give --dim {found} or leave --dim out")
    return store.add_model(name, path, found)


def probe_dim(name: str, path: str) -> int:
    """The vector size of a model: load it (on the CPU) and embed one blank image."""
    from headmaster.embedding.embedders import load_embedder

    return load_embedder(name, path, None, "cpu").dim


def model_in_use(store: Store, notify: Callable[[str], None] | None = None) -> Model:
    """The model every command embeds with: the active one. With no model registered at all, the built-in
    backbone, registered as `default` on the spot; a user who registered a model first never gets it."""
    return ensure_default_model(store, notify)


def activate_model(store: Store, name: str) -> Model:
    return store.activate_model(name)


def list_models(store: Store) -> list[tuple[Model, int]]:
    """Each model with its count of cached embeddings."""
    return [(m, store.embedding_count(m.id)) for m in store.models()]


def remove_model(store: Store, name: str) -> int:
    """Remove a model and its cached embeddings; returns how many embeddings were deleted."""
    return store.remove_model(name)


def format_model_list(rows: list[tuple[Model, int]]) -> str:
    if not rows:
        return ("No models registered: the first command that needs one registers the built-in EfficientNet-Lite0 "
                "as 'default'. Add your own with: hm model-add --name NAME --path HF_ID_OR_FOLDER")
    name_w = max(4, *(len(m.name) for m, _ in rows))
    lines = [f"  {'NAME':<{name_w}}  {'DIM':>5}  {'CACHED':>7}  PATH"]
    for m, n in rows:
        lines.append(f"{'*' if m.active else ' '} {m.name:<{name_w}}  {m.embed_dim:>5}  {n:>7}  {m.path}")
    return "\n".join(lines)
