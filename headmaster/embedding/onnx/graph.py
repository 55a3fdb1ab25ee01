"""Tracing torch modules into ONNX files, with errors that name the operation that stopped the export.

The TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`) handles the model families we
support (CLIP, SigLIP, DINOv2, timm CNNs) and needs no extra dependency. Imports torch.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from headmaster import HeadmasterError
from headmaster.embedding.embedders import Embedder
from headmaster.embedding.onnx.runtime import INPUT_NAME

OPSET = 17


class BackboneVectors(nn.Module):
    """pixels -> the vectors headmaster caches for this model (the embedder's feature rule)."""

    def __init__(self, embedder: Embedder):
        super().__init__()
        self.model = embedder.model
        self._extract = embedder.rule.extract

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._extract(self.model, pixels).float()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter prints tracer warnings, and the whole graph when it fails: keep the terminal clean."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def describe_export_error(error: Exception) -> str:
    """One line naming what could not be exported."""
    text = str(error).strip()
    op = re.search(r"operator '([^']+)'", text)
    if op:
        return f"the operation {op.group(1)} cannot be exported to ONNX (opset {OPSET})"
    first = text.splitlines()[0][:200] if text else ""
    return f"the backbone cannot be traced ({type(error).__name__}: {first})"


def export_module(module: nn.Module, sample: torch.Tensor, path: Path, outputs: list[str]) -> None:
    """Trace `module` on `sample` into `path`: one input (pixel_values) with a dynamic batch size.

    The exporter restores the wrapper's training flag afterwards, and a new nn.Module is in training
    mode, so the wrapper is put in eval mode first (else BatchNorm layers come back training).
    """
    module.eval()
    dynamic = {name: {0: "batch"} for name in [INPUT_NAME, *outputs]}
    try:
        with _quiet(), torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(module, (sample,), str(path), input_names=[INPUT_NAME], output_names=outputs,
                              dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    except Exception as e:  # the exporter raises many kinds; each becomes one line naming the cause
        Path(path).unlink(missing_ok=True)
        raise HeadmasterError(describe_export_error(e)) from None
    finally:
        module.eval()
