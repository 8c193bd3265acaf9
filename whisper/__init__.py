"""Menny's Whisper: OpenAI's speech recognition model in MLX.

The public names follow openai-whisper's, and mlx-whisper's where they differ
(`transcribe(audio, path_or_hf_repo=...)`, `load_models.load_model`), so code written for
either ports over by changing its import.
"""

from . import (
    backend,  # noqa: F401  (loads OpenBLAS before MLX is imported)
    load_models,
    model_methods,
    utils,
)
from .audio import AudioError, load_audio, log_mel_spectrogram, pad_or_trim
from .batch import transcribe_batch
from .decoding import DecodingOptions, DecodingResult, decode, detect_language
from .model import ModelDimensions, Whisper
from .models import available_models, load_model
from .transcribe import transcribe
from .version import __version__

model_methods.attach(Whisper)

__all__ = [
    "AudioError",
    "DecodingOptions",
    "DecodingResult",
    "ModelDimensions",
    "Whisper",
    "__version__",
    "available_models",
    "decode",
    "detect_language",
    "load_audio",
    "load_model",
    "load_models",
    "log_mel_spectrogram",
    "pad_or_trim",
    "transcribe",
    "transcribe_batch",
    "utils",
]
