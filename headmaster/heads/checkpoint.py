"""Checkpoint files: a head kind's dictionary saved atomically, read without running code, rebuilt as a head.

Checkpoints are plain dictionaries of tensors, strings and numbers that load with
`torch.load(..., weights_only=True)`. HEAD_KINDS says which module each checkpoint `kind`
rebuilds; a checkpoint without a kind is an mlp.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from headmaster import HeadmasterError
from headmaster.fileops import write_atomic
from headmaster.heads.arrays import write_arrays
from headmaster.heads.base import TrainedHead
from headmaster.heads.linear import LinearHead
from headmaster.heads.mlp import HeadMLP
from headmaster.heads.prototypes import PrototypeHead


def _empty_mlp(checkpoint: dict[str, Any]) -> nn.Module:
    n_classes = len(checkpoint["classes"])
    return HeadMLP(int(checkpoint["input_dim"]), 1 if checkpoint["type"] == "binary" else n_classes)


def _empty_prototypes(checkpoint: dict[str, Any]) -> nn.Module:
    return PrototypeHead.empty(int(checkpoint["input_dim"]), len(checkpoint["classes"]))


def _empty_linear(checkpoint: dict[str, Any]) -> nn.Module:
    n_classes = len(checkpoint["classes"])
    return LinearHead(int(checkpoint["input_dim"]), 1 if checkpoint["type"] == "binary" else n_classes)


# checkpoint "kind" -> the empty module its state dict loads into
HEAD_KINDS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {"mlp": _empty_mlp, "prototype": _empty_prototypes,
                                                                "linear": _empty_linear}


def save_checkpoint(checkpoint: dict[str, Any], path: Path) -> None:
    """Write atomically: a temp file in the same folder, fsynced, then renamed over the old one."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    write_atomic(path, lambda f: f.write(buffer.getvalue()))
    write_arrays(buffer.getvalue(), checkpoint)  # the numpy copy torch-free scoring reads (arrays.py)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The raw checkpoint dictionary; never runs code from the file (weights_only=True)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise HeadmasterError(f"no checkpoint at {path}") from None
    except Exception as e:
        raise HeadmasterError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") \
            from None
    missing = [k for k in ("type", "input_dim", "model", "model_state_dict", "classes") if k not in data]
    if not isinstance(data, dict) or missing:
        raise HeadmasterError(f"{path} is not a headmaster checkpoint (missing {', '.join(missing)})")
    return data


def head_from_checkpoint(checkpoint: dict[str, Any]) -> TrainedHead:
    """Rebuild the head a checkpoint describes; `kind` picks the module (missing kind: mlp)."""
    kind = checkpoint.get("kind", "mlp")
    if kind not in HEAD_KINDS:
        raise HeadmasterError(f"unknown head kind '{kind}' in checkpoint (known: {', '.join(HEAD_KINDS)})")
    module = HEAD_KINDS[kind](checkpoint)
    module.load_state_dict(checkpoint["model_state_dict"])
    module.eval()
    return TrainedHead(checkpoint, module)


def load_head(path: Path) -> TrainedHead:
    checkpoint = read_checkpoint(path)
    try:
        return head_from_checkpoint(checkpoint)
    except RuntimeError as e:  # a state dict that does not fit its declared shape
        raise HeadmasterError(f"cannot load checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
