"""mlx-whisper's `load_models.load_model(path_or_hf_repo, dtype)`.

It takes a model folder in mlx-community's layout (config.json with weights.safetensors or
weights.npz, quantized or not), the Hugging Face repo id of one (read from the Hugging Face
cache when offline), or any name `whisper.load_model` takes.
"""

from __future__ import annotations

import mlx.core as mx

from . import models
from .model import Whisper


def load_model(path_or_hf_repo: str, dtype: mx.Dtype = mx.float32) -> Whisper:
    """The model in `dtype` (float32 by default, as mlx-whisper loads it)."""
    return models.load_model(path_or_hf_repo, dtype=dtype)
