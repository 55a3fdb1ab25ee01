"""Writing the adapter folder that `hm finetune` leaves: a fine-tuned model as a registered model.

The folder's format (and reading it back) is the embedding wing's adapted model kind,
headmaster/embedding/adapted.py; this module writes one after training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from headmaster.embedding import adapted


def write_adapter_folder(folder: Path, params: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
    """Weights first, then the record that marks the folder as complete."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in params.items()}, str(folder / adapted.WEIGHTS_NAME))
    tmp = folder / (adapted.RECORD_NAME + ".tmp")
    tmp.write_text(json.dumps({"format": adapted.FORMAT, **record}, indent=2) + "\n")
    os.replace(tmp, folder / adapted.RECORD_NAME)
