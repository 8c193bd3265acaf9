"""Menny's Whisper: OpenAI's speech recognition model in MLX."""

from . import backend  # noqa: F401  (must load OpenBLAS before MLX is imported)
