"""Signal levels in dBFS (0 dBFS is digital full scale) for meters and clip summaries."""

from __future__ import annotations

import math

import numpy as np

# Reported for digital silence, where the logarithm has no value; below 16-bit quantisation
# (-96 dBFS), so any real signal reads higher.
LEVEL_FLOOR_DBFS = -100.0


def amplitude_to_dbfs(amplitude: float) -> float:
    """Converts a linear amplitude (1.0 = full scale) to dBFS, floored at LEVEL_FLOOR_DBFS."""
    if amplitude <= 0.0:
        return LEVEL_FLOOR_DBFS
    return max(LEVEL_FLOOR_DBFS, 20.0 * math.log10(amplitude))


def rms_dbfs(samples: np.ndarray) -> float:
    """RMS level of float samples in [-1, 1]; a full-scale square wave reads 0 dBFS."""
    if samples.size == 0:
        return LEVEL_FLOOR_DBFS
    x = samples.astype(np.float64, copy=False)
    return amplitude_to_dbfs(math.sqrt(float(np.mean(x * x))))


def peak_dbfs(samples: np.ndarray) -> float:
    """Peak level of float samples in [-1, 1]."""
    if samples.size == 0:
        return LEVEL_FLOOR_DBFS
    return amplitude_to_dbfs(float(np.max(np.abs(samples))))
