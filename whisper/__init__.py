"""Menny's Whisper: OpenAI's speech recognition model in MLX.

The public names follow openai-whisper's, so code written for it ports over.
"""

from . import backend  # noqa: F401  (loads OpenBLAS before MLX is imported)
from .audio import AudioError, load_audio, log_mel_spectrogram, pad_or_trim
from .batch import transcribe_batch
from .decoding import DecodingOptions, DecodingResult, decode, detect_language
from .model import ModelDimensions, Whisper
from .models import available_models, load_model
from .transcribe import transcribe

__all__ = [
    "AudioError",
    "DecodingOptions",
    "DecodingResult",
    "ModelDimensions",
    "Whisper",
    "available_models",
    "decode",
    "detect_language",
    "load_audio",
    "load_model",
    "log_mel_spectrogram",
    "pad_or_trim",
    "transcribe",
    "transcribe_batch",
]
