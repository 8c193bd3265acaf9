"""openai-whisper's text normalizers (used to score transcripts: word error rates), under its
module names.  They come from `whisper-normalizer` on PyPI, the maintained port of openai's code.
"""

from .basic import BasicTextNormalizer
from .english import EnglishTextNormalizer

__all__ = ["BasicTextNormalizer", "EnglishTextNormalizer"]
