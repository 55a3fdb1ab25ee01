"""Where adapters go, per architecture: one small table, like the embedding rules.

Every backbone we know is a stem, one sequence of blocks, and a little after
it. Fine-tuning adapts the last N blocks and what comes after them; the blocks
before stay frozen, so their output can be computed once per image view and
replayed (data.py). The first rule whose test matches the model decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from headmaster import HeadmasterError


def _get(model: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        model = getattr(model, part, None)
        if model is None:
            return None
    return model


def _linear(module: nn.Module) -> bool:
    """Attention and MLP projections of a transformer block."""
    return isinstance(module, nn.Linear)


def _pointwise(module: nn.Module) -> bool:
    """1x1 convolutions that mix channels (expansions, projections, the head conv), not depthwise ones."""
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


@dataclass(frozen=True)
class AdaptRule:
    name: str
    blocks: str  # dotted path of the block sequence (nn.ModuleList or nn.Sequential)
    after: tuple[str, ...]  # modules after the blocks that are adapted too
    eligible: Callable[[nn.Module], bool]  # which layers inside get LoRA
    any_size: bool  # the stem accepts any input size (a small stand-in input is enough when replaying)

    def applies(self, model: Any) -> bool:
        return isinstance(_get(model, self.blocks), (nn.ModuleList, nn.Sequential))


# First match wins. CLIP and SigLIP (full models or vision towers), DINOv2 and other ViTs, timm CNNs.
ADAPT_RULES: tuple[AdaptRule, ...] = (
    AdaptRule("clip-siglip", "vision_model.encoder.layers", ("visual_projection", "vision_model.head"),
              _linear, False),
    AdaptRule("vision-transformer", "encoder.layer", (), _linear, False),
    AdaptRule("vision-tower", "encoder.layers", ("head",), _linear, False),
    AdaptRule("timm-cnn", "timm_model.blocks", ("timm_model.conv_head",), _pointwise, True),
)


def adapt_rule(model: Any) -> AdaptRule:
    for rule in ADAPT_RULES:
        if rule.applies(model):
            return rule
    raise HeadmasterError(f"fine-tuning does not know where to put adapters in {type(model).__name__} "
                          f"(known: {', '.join(r.name for r in ADAPT_RULES)})")


def blocks_of(model: Any, rule: AdaptRule) -> nn.Module:
    return _get(model, rule.blocks)


def lora_targets(model: Any, rule: AdaptRule, adapt_blocks: int) -> list[str]:
    """Full module names that get LoRA: eligible layers in the last `adapt_blocks` blocks and after them."""
    blocks = blocks_of(model, rule)
    first = len(blocks) - adapt_blocks
    scopes = [f"{rule.blocks}.{i}" for i in range(first, len(blocks))]
    scopes += [a for a in rule.after if _get(model, a) is not None]
    # nn.MultiheadAttention (SigLIP's pooling head) uses its out_proj's weight directly: LoRA there would be ignored
    inside_mha = {f"{name}.out_proj" for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    names = [name for name, module in model.named_modules()
             if rule.eligible(module) and name not in inside_mha
             and any(name == s or name.startswith(s + ".") for s in scopes)]
    if not names:
        raise HeadmasterError(f"no layers to adapt in the last {adapt_blocks} block(s) of {type(model).__name__}")
    return names


def split_index(model: Any, rule: AdaptRule, adapt_blocks: int) -> int:
    """Index of the first adapted block; checks that `adapt_blocks` fits the model."""
    n = len(blocks_of(model, rule))
    if not 1 <= adapt_blocks <= n:
        raise HeadmasterError(f"--blocks must be between 1 and {n} for this model (it has {n} blocks)")
    return n - adapt_blocks
