"""openai-whisper's methods of the model: `model.transcribe(audio)`, `model.decode(mel)`,
`model.detect_language(mel)`, `model.to(device)`, `model.device` and
`model.set_alignment_heads(dump)`.

openai-whisper defines them in its model class.  Here decoding and transcription import the
model, so the model cannot import them: this module adds them to the class when it is imported,
which the package does before the first use of any engine name.
"""

from __future__ import annotations

import base64
import gzip

import mlx.core as mx
import numpy as np

from .backends import backend_for
from .decoding import decode, detect_language
from .model import Whisper
from .models import mlx_device
from .runtime import choose_device
from .transcribe import transcribe


def to(model: Whisper, device: object) -> Whisper:
    """PyTorch's `module.to(device)`: MLX computes on `device` ("cpu", "gpu", or PyTorch's
    "cuda" and "mps" for the GPU) from now on, as with load_model's `device`.  The weights
    stay where they are: every MLX device reads the same memory.  Returns the model."""
    chosen = choose_device(mlx_device(device))
    mx.set_default_device(chosen)
    model.backend = backend_for(model, chosen)
    return model


def device(model: Whisper) -> mx.Device:
    """Where the model computes: MLX's default device, which load_model and `to` set."""
    return mx.default_device()


def set_alignment_heads(model: Whisper, dump: bytes | np.ndarray) -> None:
    """Choose the cross-attention heads that time words.  `dump` is as openai-whisper stores
    them (base85 of the gzipped (n_text_layer, n_text_head) boolean mask), or, as mlx-whisper
    also takes them, an array: (n, 2) [layer, head] pairs or the boolean mask itself."""
    shape = (model.dims.n_text_layer, model.dims.n_text_head)
    if isinstance(dump, (bytes, str)):
        dump = np.frombuffer(gzip.decompress(base64.b85decode(dump)), dtype=bool).reshape(shape)
    heads = np.asarray(dump)
    if heads.dtype == bool:
        heads = np.argwhere(heads.reshape(shape))
    if heads.ndim != 2 or heads.shape[1] != 2 or not ((heads >= 0) & (heads < shape)).all():
        raise ValueError(f"alignment heads are [layer, head] pairs within {shape}; got {heads.tolist()}")
    model.alignment_heads = heads.tolist()


def attach(cls: type[Whisper]) -> None:
    """Give the model class openai-whisper's methods."""
    cls.transcribe = transcribe
    cls.decode = decode
    cls.detect_language = detect_language
    cls.to = to
    cls.device = property(device)
    cls.set_alignment_heads = set_alignment_heads


attach(Whisper)
