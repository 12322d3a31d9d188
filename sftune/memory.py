"""Less activation memory for the same math: SwiGLU and RMSNorm that keep fewer tensors for the backward pass.

`down(silu(gate(x)) * up(x))` keeps gate(x), silu(gate(x)), up(x) and the product for backward. The fused
function below keeps gate(x) and up(x) only and recomputes silu in backward: one hidden-width activation
less per layer (about 0.75 GB for 4k tokens through SmolLM2's 30 layers), with identical results.
RMSNorm likewise keeps its input and the per-token scale, not the normalised copy (about 0.55 GB more).
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


class RMSNorm(torch.autograd.Function):
    """weight * x / rms(x), computed in float32 as transformers does; keeps x and 1/rms only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, weight, rstd = ctx.saved_tensors
        compute = rstd.dtype
        normalized = x.to(compute) * rstd
        grad_weight = (grad.to(compute) * normalized).reshape(-1, normalized.shape[-1]).sum(0).to(weight.dtype)
        g = grad.to(compute) * weight.to(compute)
        grad_x = rstd * (g - normalized * (g * normalized).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


def _fused_rms_norm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def is_llama_rms_norm(module: Any) -> bool:
    """Llama-style RMSNorm (weight * normalised); Gemma's (1 + weight) variant names its epsilon `eps` instead."""
    return (
        type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and hasattr(module, "weight")
    )


def use_memory_efficient_mlp(model: Any) -> int:
    """Give every SwiGLU MLP and Llama-style RMSNorm of `model` the fused forward; return how many changed."""
    changed = 0
    for module in model.modules():
        for matches, forward in ((is_swiglu_mlp, _fused_mlp_forward), (is_llama_rms_norm, _fused_rms_norm_forward)):
            if matches(module) and getattr(module.forward, "__func__", None) is not forward:
                module.forward = types.MethodType(forward, module)
                changed += 1
    return changed
