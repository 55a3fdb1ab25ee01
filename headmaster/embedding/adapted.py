"""The adapted model kind: a folder `hm finetune` wrote, loaded as a registered model.

    <folder>/adapter.safetensors    the LoRA weights (nothing else of the backbone)
    <folder>/headmaster-adapter.json the base model (name, path, dim), where the adapters sit, and the
                                     training record (heads, images, epochs, validation scores)

The JSON file marks the folder: `load_embedder` (the MODEL_KINDS table of embedders.py)
hands such a folder here, which loads the base through the usual path (the `load_base`
it is given), adds the adapters and merges them into the weights, so inference costs
exactly what the base costs. The format is defined here, where it is read; `hm finetune`
writes it (headmaster/finetune/adapters.py), so the embedding wing never imports finetune.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from headmaster import HeadmasterError

RECORD_NAME = "headmaster-adapter.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT = 1


def is_adapter_folder(path: str) -> bool:
    """Cheap (no imports): whether `path` is a folder `hm finetune` wrote."""
    return os.path.isfile(os.path.join(os.path.expanduser(path), RECORD_NAME))


def lora_config(rank: int, alpha: float, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")


def add_adapters(model: nn.Module, rank: int, alpha: float, targets: list[str],
                 memory_format: torch.memory_format = torch.contiguous_format) -> dict[str, nn.Parameter]:
    """Wrap `targets` with fresh LoRA adapters in place (B = 0: the model's output is unchanged); freeze the rest.

    Returns the adapter parameters by name.
    """
    from peft import inject_adapter_in_model

    inject_adapter_in_model(lora_config(rank, alpha, targets), model)
    model.to(memory_format=memory_format)  # the new adapter convolutions in the base's layout (Embedder.memory_format)
    params = {}
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            params[name] = p
    return params


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its layer's weight and put the plain layer back."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, module in wrapped:
        module.merge()
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], module.get_base_layer())


def read_record(folder: str | Path) -> dict[str, Any]:
    path = Path(os.path.expanduser(str(folder))) / RECORD_NAME
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise HeadmasterError(f"{folder} is not a fine-tuned model folder (no {RECORD_NAME})") from None
    except (OSError, ValueError) as e:
        raise HeadmasterError(f"adapter folder {folder} is damaged: {RECORD_NAME} is unreadable ({e})") from None
    missing = [k for k in ("base", "lora") if not isinstance(record.get(k), dict)]
    missing += [f"base.{k}" for k in ("name", "path") if not isinstance(record.get("base", {}).get(k), str)]
    missing += [f"lora.{k}" for k in ("rank", "alpha", "targets") if k not in record.get("lora", {})]
    if not isinstance(record, dict) or missing:
        raise HeadmasterError(f"adapter folder {folder} is damaged: {RECORD_NAME} lacks {', '.join(missing)}")
    return record


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(os.path.expanduser(str(folder))) / WEIGHTS_NAME
    if not path.is_file():
        raise HeadmasterError(f"adapter folder {folder} is damaged: {WEIGHTS_NAME} is missing")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise HeadmasterError(f"adapter folder {folder} is damaged: cannot read {WEIGHTS_NAME} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def load_adapted(name: str, path: str, expected_dim: int | None, device: str | None, load_base: Callable[..., Any]):
    """An Embedder for a fine-tuned model: the base loaded with `load_base` (load_embedder), then its adapters
    merged in."""
    record = read_record(path)
    weights = read_weights(path)
    base = record["base"]
    try:
        embedder = load_base(base["name"], base["path"], None, device)
    except HeadmasterError as e:
        raise HeadmasterError(f"model '{name}' adapts base model '{base['name']}' ({base['path']}), "
                              f"which cannot be loaded: {e}") from None
    lora = record["lora"]
    try:
        params = add_adapters(embedder.model, int(lora["rank"]), float(lora["alpha"]), list(lora["targets"]),
                              embedder.memory_format)
    except (ValueError, KeyError, AttributeError) as e:
        raise HeadmasterError(f"adapter folder {path} does not fit base model '{base['name']}': {e}") from None
    missing = sorted(set(params) - set(weights))
    unknown = sorted(set(weights) - set(params))
    if missing or unknown:
        raise HeadmasterError(f"adapter folder {path} is damaged or does not fit base model '{base['name']}': "
                              f"{len(missing)} adapter weights missing, {len(unknown)} unknown")
    with torch.no_grad():
        for key, p in params.items():
            if p.shape != weights[key].shape:
                raise HeadmasterError(f"adapter folder {path} does not fit base model '{base['name']}': "
                                      f"{key} has shape {tuple(weights[key].shape)}, expected {tuple(p.shape)}")
            p.copy_(weights[key].to(p.dtype))
    merge_adapters(embedder.model)
    embedder.model.to(memory_format=embedder.memory_format)  # merged weights may have left the fast layout
    embedder.model.requires_grad_(False)
    embedder.model.eval()
    if expected_dim is not None and embedder.dim != expected_dim:
        raise HeadmasterError(
            f"model '{name}' produces {embedder.dim}-dimensional vectors but was registered with --dim "
            f"{expected_dim}; remove it and add it again with --dim {embedder.dim}")
    embedder.name, embedder.path = name, path
    return embedder
