"""openai-whisper's `whisper.normalizers.basic`, from `whisper-normalizer`."""

from whisper_normalizer.basic import BasicTextNormalizer, remove_symbols, remove_symbols_and_diacritics

__all__ = ["BasicTextNormalizer", "remove_symbols", "remove_symbols_and_diacritics"]
