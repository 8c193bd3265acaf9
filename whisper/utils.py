"""openai-whisper's `whisper.utils`: writing results, and the command line's value parsers."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass

from .decoding import compression_ratio
from .writers import FORMATS, SubtitleOptions, format_timestamp, write_result

__all__ = [
    "ResultWriter",
    "compression_ratio",
    "format_timestamp",
    "get_writer",
    "optional_float",
    "optional_int",
    "str2bool",
]


def str2bool(text: str) -> bool:
    if text.lower() in {"true", "1", "yes"}:
        return True
    if text.lower() in {"false", "0", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def optional_int(text: str) -> int | None:
    return None if text == "None" else int(text)


def optional_float(text: str) -> float | None:
    return None if text == "None" else float(text)


@dataclass(frozen=True)
class ResultWriter:
    """Writes a result to `<output_dir>/<audio file's stem>.<output_format>` ("all": every format).

    Called as openai-whisper's writers are: `writer(result, audio_path, options)`, where
    `options` (a dict, or keyword arguments) holds `SubtitleOptions` fields: highlight_words,
    max_line_width, max_line_count, max_words_per_line.
    """

    output_format: str
    output_dir: str | os.PathLike

    def __call__(self, result: dict, audio_path: str | os.PathLike, options: dict | None = None, **kwargs) -> None:
        write_result(
            result, audio_path, self.output_dir, self.output_format, SubtitleOptions(**(options or {}), **kwargs)
        )


def get_writer(output_format: str, output_dir: str | os.PathLike) -> Callable[..., None]:
    """openai-whisper's writer of one format (txt, vtt, srt, tsv, json) or of all of them."""
    if output_format not in (*FORMATS, "all"):
        raise ValueError(f"unknown output format {output_format!r}; use one of {', '.join(FORMATS)} or all")
    return ResultWriter(output_format, output_dir)
