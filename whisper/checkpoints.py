"""What every checkpoint reader (CTranslate2, openai-whisper's `.pt`, Hugging Face transformers)
hands over: a model's dimensions and weights under our names, checked whole.

Weights stored as float16 stay float16 (exact, and half the size of a cached large model); any
other type becomes float32, which holds bfloat16 and float16 values exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mlx.utils import tree_flatten

from .model import ModelDimensions, Whisper


class ModelFormatError(ValueError):
    """A model file that cannot be read or does not hold a Whisper model."""


@dataclass
class Checkpoint:
    dims: ModelDimensions
    weights: dict[str, np.ndarray]  # our parameter names, MLX layouts
    alignment_heads: list[list[int]] | None = None  # as the checkpoint names them; None: the default


def mlx_layout(name: str, value: np.ndarray) -> np.ndarray:
    """A PyTorch-layout weight in MLX's: convolutions (out, in, kernel) become (out, kernel, in)."""
    return value.transpose(0, 2, 1) if name.startswith("encoder.conv") and value.ndim == 3 else value


def checked(checkpoint: Checkpoint, source: object) -> Checkpoint:
    """The checkpoint, once its weights are exactly the parameters of a model of its dimensions,
    each of the right shape: a missing tensor would leave random weights, an unknown one means a
    layout we do not understand, and either would give wrong text without a word."""
    expected = {name: tuple(value.shape) for name, value in tree_flatten(Whisper(checkpoint.dims).parameters())}
    weights = checkpoint.weights
    missing = sorted(set(expected) - set(weights))
    unknown = sorted(set(weights) - set(expected))
    if missing or unknown:
        raise ModelFormatError(
            f"{source}: not a Whisper checkpoint of the shape its config gives: "
            f"missing {missing[:5]}, unknown {unknown[:5]}"
        )
    for name, shape in expected.items():
        if weights[name].shape != shape:
            raise ModelFormatError(f"{source}: {name} has shape {weights[name].shape}, expected {shape}")
    checkpoint.weights = {
        name: np.ascontiguousarray(value, dtype=np.float16 if value.dtype == np.float16 else np.float32)
        for name, value in weights.items()
    }
    return checkpoint
