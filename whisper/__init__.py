"""Menny's Whisper: OpenAI's speech recognition model in MLX.

The public names follow openai-whisper's, and mlx-whisper's where they differ
(`transcribe(audio, path_or_hf_repo=...)`, `load_models.load_model`), so code written for
either ports over by changing its import.

Importing this package changes nothing in the process: the engine's modules (and MLX) load when
one of these names or modules is first used, after `configure()` has set the process up for
them (see `whisper.runtime`).
"""

from __future__ import annotations

import importlib
import sys
import types

from .runtime import configure
from .version import __version__

_NAMES = {
    "AudioError": "audio",
    "load_audio": "audio",
    "log_mel_spectrogram": "audio",
    "pad_or_trim": "audio",
    "transcribe_batch": "batch",
    "DecodingOptions": "decoding",
    "DecodingResult": "decoding",
    "decode": "decoding",
    "detect_language": "decoding",
    "ModelDimensions": "model",
    "Whisper": "model",
    "available_models": "models",
    "load_model": "models",
    "transcribe": "transcribe",
}
_MODULES = ("audio", "decoding", "load_models", "model", "models", "normalizers", "timing", "tokenizer", "utils")

__all__ = ["__version__", "configure", *_NAMES, "load_models", "utils"]


def _engine_module(name: str) -> types.ModuleType:
    """One of the engine's modules, the process configured first; the model then has
    openai-whisper's methods (`whisper.model_methods`)."""
    configure()
    importlib.import_module(".model_methods", __name__)
    return importlib.import_module(f".{name}", __name__)


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(_engine_module(_NAMES[name]), name)
    elif name in _MODULES:
        value = _engine_module(name)
    else:
        raise AttributeError(f"module 'whisper' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, *_MODULES})


class _Package(types.ModuleType):
    """`whisper.transcribe` is the function, as in openai-whisper, even once its module is imported
    (the import system then sets the package's attribute to the module)."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and _NAMES.get(name) == name:
            configure()
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
