"""The model registry commands: model-add, model-activate, model-list, model-remove."""

from __future__ import annotations

import os
from headmaster.errors import HeadmasterError
from headmaster.store import Model, Store


def normalise_model_path(path: str) -> str:
    """Local folders are stored as absolute paths (so any working directory works); hub ids as given."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    if path.startswith((".", "/", "~")):
        raise HeadmasterError(f"model folder not found: {path}")
    return path


def add_model(store: Store, name: str, path: str, dim: int) -> Model:
    """Register a model; the first one registered becomes the active one."""
    return store.add_model(name, normalise_model_path(path), dim)


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
        return "No models registered. Add one with: hm model-add --name NAME --path HF_ID_OR_FOLDER --dim DIM"
    name_w = max(4, *(len(m.name) for m, _ in rows))
    lines = [f"  {'NAME':<{name_w}}  {'DIM':>5}  {'CACHED':>7}  PATH"]
    for m, n in rows:
        lines.append(f"{'*' if m.active else ' '} {m.name:<{name_w}}  {m.embed_dim:>5}  {n:>7}  {m.path}")
    return "\n".join(lines)
