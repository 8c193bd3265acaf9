"""The process-wide set-up the engine wants on this machine, done by `configure()` only, and the
choice of device.

The mlx[cpu] wheel for Linux links the reference BLAS, which multiplies matrices many times
slower than OpenBLAS.  Loading OpenBLAS globally before MLX makes MLX's BLAS calls resolve to it,
so `configure()` must run before the first `import mlx.core`; `import whisper` itself imports
MLX only when an engine name is first used, and configures the process then.

MLX runs on a GPU where its wheel has one (mlx[cuda13] on NVIDIA cards, mlx on Apple silicon);
`choose_device` picks it unless told otherwise.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from dataclasses import dataclass

log = logging.getLogger("whisper")

_OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
)


# OpenBLAS's threads spin for 2^n cycles after each product before they sleep (by default n = 28).
# A prompt's pass calls it between our kernels, whose threads then shared the cores with spinning
# ones, and that pass and the steps after it ran slower (bench/NOTES.md).  2^4 cycles: they
# sleep at once, and waking them costs a product little.
OPENBLAS_THREAD_TIMEOUT = "4"


def _preload_openblas() -> str | None:
    if not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return None
    for path in _OPENBLAS_CANDIDATES:
        if os.path.exists(path):
            os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT)  # read when it loads
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path
    log.warning(
        "OpenBLAS not found: MLX will use the slow reference BLAS on this CPU "
        "(install it with: apt-get install libopenblas0-pthread)"
    )
    return None



# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _keep_freed_memory() -> bool:
    """On Linux CPUs MLX takes each array's memory from malloc and frees it when the array goes,
    and glibc gives freed blocks of 128 KB and more back to the kernel: every encoder window
    then faulted in fresh zeroed pages (bench/NOTES.md).  Blocks under 32 MB now come from the
    heap, which is never trimmed, so they are reused; larger ones (the float32 copies made while
    loading) still go back."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl): its own policy stays
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))


@dataclass(frozen=True)
class Configuration:
    openblas: str | None  # the OpenBLAS library loaded before MLX, if any
    keeps_freed_memory: bool


_configuration: Configuration | None = None


def configure() -> Configuration:
    """Load OpenBLAS before MLX and keep freed memory in the process (Linux); once per process.
    Where MLX was imported already, OpenBLAS can no longer take over its BLAS: that is logged."""
    global _configuration
    if _configuration is None:
        if "mlx.core" in sys.modules:
            log.warning("MLX was imported before whisper.configure(): its matrix products use the slow reference BLAS")
        _configuration = Configuration(_preload_openblas(), _keep_freed_memory())
    return _configuration


DEVICES = ("cpu", "gpu")


def choose_device(device: str | None = None):
    """The MLX device to compute on: "gpu" or "cpu", or None for the GPU where MLX has one."""
    import mlx.core as mx  # only here: OpenBLAS must be loaded before MLX

    has_gpu = mx.is_available(mx.gpu)
    if device is None:
        return mx.gpu if has_gpu else mx.cpu
    if device not in DEVICES:
        raise ValueError(f"device is 'cpu' or 'gpu', not {device!r}")
    if device == "gpu" and not has_gpu:
        raise ValueError(
            "MLX sees no GPU here: on an NVIDIA card install requirements-cuda.txt (mlx[cuda13]) "
            "instead of mlx[cpu]; or use device='cpu'"
        )
    return mx.gpu if device == "gpu" else mx.cpu
