"""The finetune wing: LP-FT fine-tuning, LoRA adapters on the last blocks of a backbone (hm finetune).

targets.py  which modules of which architecture get adapters (a small table)
data.py     the heads' images, decoded, augmented and run once through the frozen trunk
train.py    linear probing, then adapters and heads together; the command's library function
adapters.py writing the adapter folder (reading it back as a registered model: embedding/adapted.py)

It builds on embedding and heads; nothing but the shells imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from headmaster import lazy_exports

# name -> the module of this wing that defines it; imported on first use, so importing the wing costs nothing
_EXPORTS = {
    "FinetuneConfig": "train",
    "finetune": "train",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from headmaster.finetune.train import FinetuneConfig, finetune

__getattr__ = lazy_exports(__name__, _EXPORTS)
