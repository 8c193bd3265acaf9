"""Choose how MLX computes on this machine.

The mlx[cpu] wheel for Linux links the reference BLAS, which multiplies matrices ~35x
slower than OpenBLAS.  Loading OpenBLAS globally before MLX makes MLX's BLAS calls
resolve to it.  This module must therefore run before the first `import mlx.core`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger("whisper")

_OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
)


def _preload_openblas() -> str | None:
    if not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return None
    for path in _OPENBLAS_CANDIDATES:
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path
    log.warning(
        "OpenBLAS not found: MLX will use the slow reference BLAS on this CPU "
        "(install it with: apt-get install libopenblas0-pthread)"
    )
    return None


OPENBLAS = _preload_openblas()
