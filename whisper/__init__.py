"""Menny's Whisper: OpenAI's speech recognition model in MLX.

The public names follow openai-whisper's, so code written for it ports over.  Importing this
package changes nothing in the process: the engine's modules (and MLX) load when one of these
names is first used, after `configure()` has set the process up for them (see `whisper.runtime`).
"""

from __future__ import annotations

import importlib
import sys
import types

from .runtime import configure

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

__all__ = ["configure", *_NAMES]


def __getattr__(name: str):
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'whisper' has no attribute {name!r}")
    configure()
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


class _Package(types.ModuleType):
    """`whisper.transcribe` is the function, as in openai-whisper, even once its module is imported
    (the import system then sets the package's attribute to the module)."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and _NAMES.get(name) == name:
            configure()
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
