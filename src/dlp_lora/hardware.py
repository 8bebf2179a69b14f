"""What this CPU is: its model name and the instruction-set flags that decide which kernels are fast on it.

Read from /proc/cpuinfo (Linux; elsewhere the fields are empty) and from torch's own dispatch level. Used
by the pytest header, by `--quantize auto`'s log line and by the benchmarks' records, so every figure says
which CPU it was measured on.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["CpuInfo", "cpu_info", "KERNEL_FLAGS"]

KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")
"""The flags that change which int8/bf16 kernels are fast (VNNI and AMX do int8 dot products in hardware)."""


@dataclass(frozen=True)
class CpuInfo:
    model: str
    """The CPU's model name, e.g. 'AMD EPYC 7763 64-Core Processor'."""
    flags: tuple[str, ...]
    """Those of KERNEL_FLAGS the CPU reports."""
    torch_capability: str
    """The vector level torch dispatches its own kernels at (e.g. AVX2, AVX512)."""
    cores: int

    def __str__(self) -> str:
        return (
            f"{self.model or platform.processor() or 'unknown CPU'}, {self.cores} cores, flags "
            f"{' '.join(self.flags) or 'none of ' + '/'.join(KERNEL_FLAGS)}, torch kernels {self.torch_capability}"
        )

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "flags": list(self.flags),
            "torch_capability": self.torch_capability,
            "cores": self.cores,
        }


def cpu_info() -> CpuInfo:
    """This machine's CpuInfo (the first processor entry of /proc/cpuinfo)."""
    model, flags = "", set()
    path = Path("/proc/cpuinfo")
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
            if model and flags:
                break
    return CpuInfo(
        model=model,
        flags=tuple(f for f in KERNEL_FLAGS if f in flags),
        torch_capability=torch.backends.cpu.get_cpu_capability(),
        cores=os.cpu_count() or 1,
    )
