"""Model FLOPs and the device's peak, for the model FLOPs utilisation (MFU) on every metrics line.

MFU = model FLOPs per token x tokens/s per device / peak FLOP/s of one device. The model FLOPs are the
useful ones (`Transformer.flops_per_token`: no recomputation, no padding), so activation checkpointing
or a slow kernel lowers MFU, as it should. Peaks are dense (no sparsity) per dtype: a table for known
GPUs; elsewhere (CPU, an unknown GPU) a matmul measured for about a second, cached per machine, thread
count and dtype. `cluster.peak_flops` overrides both.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Dense peak TFLOP/s by dtype ("tf32" is float32 matmuls at matmul_precision high or medium), from the
# vendors' data sheets (SXM parts unless named). First match of the device name wins: PCIe before SXM.
GPU_PEAKS = (
    ("H100 PCIe", {"bfloat16": 756, "float16": 756, "tf32": 378, "float32": 51}),
    ("H100", {"bfloat16": 989, "float16": 989, "tf32": 494, "float32": 67}),
    ("H200", {"bfloat16": 989, "float16": 989, "tf32": 494, "float32": 67}),
    ("H800", {"bfloat16": 989, "float16": 989, "tf32": 494, "float32": 67}),
    ("B200", {"bfloat16": 2250, "float16": 2250, "tf32": 1100, "float32": 80}),
    ("A100", {"bfloat16": 312, "float16": 312, "tf32": 156, "float32": 19.5}),
    ("L40S", {"bfloat16": 362, "float16": 362, "tf32": 183, "float32": 91.6}),
    ("A10", {"bfloat16": 125, "float16": 125, "tf32": 62.5, "float32": 31.2}),
    ("L4", {"bfloat16": 121, "float16": 121, "tf32": 60, "float32": 30.3}),
    ("V100", {"float16": 125, "float32": 15.7}),
)


def matmul_dtype(dtype: str, device_type: str, matmul_precision: str = "high") -> str:
    """The dtype the matmuls run in: float32 on a GPU at precision high or medium is tf32."""
    if dtype == "float32" and device_type == "cuda" and matmul_precision != "highest":
        return "tf32"
    return dtype


def table_peak(device_name: str, dtype: str) -> float | None:
    for name, peaks in GPU_PEAKS:
        if name.lower() in device_name.lower():
            return peaks[dtype] * 1e12 if dtype in peaks else None
    return None


def cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanollama" / "peak_flops.json"


def device_key(device: torch.device, dtype: str) -> str:
    if device.type == "cuda":
        return f"{platform.node()}|{torch.cuda.get_device_name(device)}|{dtype}"
    cpu = platform.processor() or platform.machine()
    return f"{platform.node()}|{cpu}|{torch.get_num_threads()} threads|{dtype}"


def measure_peak(device: torch.device, dtype: str, seconds: float = 1.0) -> float:
    """The best FLOP/s of a square matmul over about `seconds` (tf32 runs float32 at the default
    precision the run sets)."""
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)
    best, start = float("inf"), time.perf_counter()
    for i in range(1000):
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first call warms up
            best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > seconds and i >= 2:
            break
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: str, matmul_precision: str = "high", override: float = 0.0):
    """Peak FLOP/s of one device for the run's dtype: `override` (cluster.peak_flops), the GPU table, or a
    measurement cached in ~/.cache/nanollama/peak_flops.json (XDG_CACHE_HOME)."""
    if override > 0:
        return override
    dtype = matmul_dtype(dtype, device.type, matmul_precision)
    if device.type == "cuda" and (peak := table_peak(torch.cuda.get_device_name(device), dtype)):
        return peak
    key, path = device_key(device, dtype), cache_path()
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(path.read_text())
        if isinstance(cached.get(key), (int, float)) and cached[key] > 0:
            return float(cached[key])
    peak = measure_peak(device, dtype)
    logger.info(f"measured peak {peak / 1e9:.1f} GFLOP/s ({key}), cached in {path}")
    with contextlib.suppress(OSError, ValueError):  # a read-only home only costs a second per run
        path.parent.mkdir(parents=True, exist_ok=True)
        cached = json.loads(path.read_text()) if path.is_file() else {}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**cached, key: peak}, indent=1) + "\n")
        os.replace(tmp, path)
    return peak


def model_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: the model's own count (`flops_per_token(seq_len)`, e.g. a Transformer's),
    else 6 x its parameters outside embedding tables (matmul weights; attention not counted)."""
    if hasattr(model, "flops_per_token"):
        return float(model.flops_per_token(seq_len))
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return 6.0 * sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
