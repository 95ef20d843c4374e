"""What this machine's CPU is: the one place that reads /proc/cpuinfo.

The torch backend picks its default dtype and its decode kernels from the instruction-set flags;
the benchmark writes the CPU's name beside its figures.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CPU:
    name: str  # "AMD EPYC 9B45", or platform's word for it where /proc/cpuinfo is missing
    flags: frozenset[str]  # x86 `flags` or Arm `Features` (avx2, fma, avx512_bf16, amx_bf16, bf16, ...); empty: unknown

    @property
    def x86(self) -> bool:
        return platform.machine() in ("x86_64", "AMD64")

    @property
    def arm(self) -> bool:
        return platform.machine() in ("aarch64", "arm64")


@functools.cache
def cpu_info() -> CPU:
    """The CPU's name and flags, from /proc/cpuinfo (Linux). Elsewhere the flags are unknown (empty):
    macOS and Windows have no cheap way to ask, and callers then keep their safe choice."""
    fallback = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return CPU(fallback, frozenset())
    names, flags = [], set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            names.append(value.strip())
        elif key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return CPU(names[0] if names else fallback, frozenset(flags))
