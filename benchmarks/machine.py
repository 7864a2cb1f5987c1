"""What a benchmark ran on: every benchmark prints and records it, since figures only compare within one machine; and
writing what it measured."""

import json
import os
import platform
import time

import torch

from pipeline.sampling import cpu_flags, native_bf16

# The CPU features that decide which kernels torch can use here (bf16 needs avx512_bf16 or amx_bf16).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def matmul_tflops(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """Measured TFLOP/s of a large square matmul: the practical ceiling for this hardware and dtype."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def describe(device: torch.device) -> dict:
    """The processor, its relevant flags, threads, versions and measured matmul peaks."""
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or "cpu"}
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            text = f.read()
        info["cpu"] = next(
            (line.split(":", 1)[1].strip() for line in text.splitlines() if "model name" in line), "cpu"
        )
        info["cpu_flags"] = [flag for flag in CPU_FLAGS if flag in cpu_flags()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    # Where bf16 is not native (a CPU with AVX2 alone) torch emulates it, far slower than fp32: minutes for this matmul.
    info["matmul_tflops"] = {
        "fp32": matmul_tflops(torch.float32, device),
        "bf16": matmul_tflops(torch.bfloat16, device) if native_bf16(device) else None,
    }
    return info


def write_result(result: dict, path: str) -> None:
    """Write a benchmark's result as JSON at `path`, its folder made if need be, and say so."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"Wrote {path}")
