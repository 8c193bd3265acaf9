"""The engine's version, as `whisper.__version__` (openai-whisper's name)."""

__version__ = "0.1.0"
