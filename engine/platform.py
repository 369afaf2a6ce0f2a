"""Platform setup that must happen before MLX loads: an optimized BLAS on Linux CPUs.

The `mlx[cpu]` wheel links reference BLAS (3-7 GFLOP/s for float32 matmuls). Loading
OpenBLAS into the process with RTLD_GLOBAL before `import mlx.core` makes MLX resolve its
BLAS symbols there: 20-50x faster float32 matmuls, measured the same as LD_PRELOAD.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

log = logging.getLogger("shoal")

OPENBLAS_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
)
FIX = "sudo apt-get install libopenblas0-pthread"


def find_openblas() -> str | None:
    arch = platform.machine()
    for pattern in OPENBLAS_CANDIDATES:
        path = pattern.format(arch=arch)
        if os.path.exists(path):
            return path
    return None


def preload_blas(mode: str = "auto") -> str:
    """Load an optimized BLAS if this is Linux and `mode` allows it; returns a line for the
    startup log. mode: "auto" (OpenBLAS if installed), "reference" (leave MLX's own), or a
    path to a BLAS shared library."""
    if sys.platform != "linux" or mode == "reference":
        return "BLAS: MLX default" if sys.platform != "linux" else "BLAS: reference (as asked)"
    if "mlx.core" in sys.modules:
        log.warning("MLX was imported before the BLAS preload: float32 matmuls use reference BLAS")
        return "BLAS: reference (MLX imported too early)"
    path = find_openblas() if mode == "auto" else mode
    if path is None:
        log.warning("No optimized BLAS found: float32 matmuls on CPU will be 20-50x slower. Fix: %s", FIX)
        return f"BLAS: reference (slow; fix: {FIX})"
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    return f"BLAS: {path} (preloaded)"


def set_blas_threads(n: int) -> bool:
    """Limit the loaded OpenBLAS to n threads (ranks sharing one machine split its cores:
    two ranks of two threads each on two cores made a tensor-parallel decode step 2x slower
    than one thread each). False when the BLAS has no such knob (reference BLAS)."""
    try:
        ctypes.CDLL(None).openblas_set_num_threads(ctypes.c_int(n))
    except AttributeError:
        return False
    return True
