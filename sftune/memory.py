"""Less activation memory for the same math: a SwiGLU that keeps fewer tensors for the backward pass.

`down(silu(gate(x)) * up(x))` keeps gate(x), silu(gate(x)), up(x) and the product for backward. The fused
function below keeps gate(x) and up(x) only and recomputes silu in backward: one hidden-width activation
less per layer (about 0.75 GB for 4k tokens through SmolLM2's 30 layers), with identical results.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F


class SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        # aten's fused silu backward: one pass instead of a chain of elementwise ops.
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return SwiGLU.apply(gate, up)


def _fused_mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


SILU_CLASSES = ("SiLU", "SiLUActivation")  # torch's and transformers' names for the same function


def is_swiglu_mlp(module: Any) -> bool:
    has_projections = all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj"))
    return has_projections and type(getattr(module, "act_fn", None)).__name__ in SILU_CLASSES


def use_memory_efficient_mlp(model: Any) -> int:
    """Give every SwiGLU MLP of `model` the fused forward; return how many were changed."""
    changed = 0
    for module in model.modules():
        if is_swiglu_mlp(module) and module.forward.__func__ is not _fused_mlp_forward:
            module.forward = types.MethodType(_fused_mlp_forward, module)
            changed += 1
    return changed
