"""Throughput and model FLOPs utilisation (MFU): how close training runs to the machine's limit."""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

# Dense bf16/fp16 tensor-core peaks (FLOP/s) of common training GPUs, by a substring of the device name.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
                  "V100": 125e12, "T4": 65e12, "RTX 4090": 165e12, "RTX 3090": 71e12}  # fmt: skip


@functools.cache
def peak_flops(device_type: str = "cpu", dtype: torch.dtype | None = None) -> float:
    """The machine's peak FLOP/s for matmuls in `dtype` (the precision training runs its matmuls in): a table of
    bf16/fp16 peaks for known GPUs, else a measured large matmul (CPU, unknown GPU)."""
    if device_type == "cuda" and torch.cuda.is_available() and dtype in (None, torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name()
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
    # Timings of a shared CPU are noisy; the best of a few trials is the closest to the peak.
    return max(measured_matmul_flops(device_type, dtype=dtype) for _ in range(3))


def measured_matmul_flops(
    device_type: str = "cpu", size: int = 1024, repeats: int = 8, dtype: torch.dtype | None = None
) -> float:
    device = torch.device(device_type)
    if dtype is None:
        dtype = torch.float32 if device_type == "cpu" else torch.bfloat16
    # A generator of its own: measuring must never move the training run's random numbers (dropout, shuffling).
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    a @ b  # warm up
    if device_type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device_type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def matmul_dtype(args: Any, model: Any) -> torch.dtype:
    """The precision training runs its matmuls in: the autocast dtype under bf16/fp16, else the weights'."""
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return getattr(model, "dtype", torch.float32)


def training_flops_per_token(model: Any) -> int:
    """Forward (2N) + activation gradients (2N) + weight gradients of trainable parameters (2N_trainable):
    6N for full fine-tuning, about 4N for adapters."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * total + 2 * trainable


class ThroughputMeter:
    """Tokens/s and MFU between two calls of `measure`."""

    def __init__(self, flops_per_token: int, device_type: str = "cpu", dtype: torch.dtype | None = None) -> None:
        self.flops_per_token = flops_per_token
        self.device_type = device_type
        self.dtype = dtype
        self.last_time = time.perf_counter()
        self.last_tokens = 0

    def measure(self, total_tokens: int) -> dict[str, float]:
        now = time.perf_counter()
        seconds, tokens = now - self.last_time, total_tokens - self.last_tokens
        self.last_time, self.last_tokens = now, total_tokens
        if seconds <= 0 or tokens <= 0:
            return {}
        tokens_per_second = tokens / seconds
        mfu = self.flops_per_token * tokens_per_second / peak_flops(self.device_type, self.dtype)
        return {"tokens_per_second": round(tokens_per_second, 1), "mfu": round(mfu, 4)}
