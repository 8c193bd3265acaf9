"""openai-whisper's `whisper.utils`: writing results, and the command line's value parsers."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TextIO

from .decoding import compression_ratio
from .writers import FORMATS, SubtitleOptions, format_timestamp, render, write_result

__all__ = [
    "ResultWriter",
    "WriteJSON",
    "WriteSRT",
    "WriteTSV",
    "WriteTXT",
    "WriteVTT",
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
    raise ValueError(f"Expected a boolean value (True or False), got {text!r}")


def optional_int(text: str) -> int | None:
    return None if text == "None" else int(text)


def optional_float(text: str) -> float | None:
    return None if text == "None" else float(text)


class ResultWriter:
    """openai-whisper's writer of one format: `writer(result, audio_path, options)` writes
    `<output_dir>/<audio file's stem>.<extension>`; `write_result(result, file, options)` writes
    to an open text file.  `options` (a dict, or keyword arguments) holds `SubtitleOptions`
    fields: highlight_words, max_line_width, max_line_count, max_words_per_line."""

    extension: str

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = output_dir

    def __call__(self, result: dict, audio_path: str | os.PathLike, options: dict | None = None, **kwargs) -> None:
        write_result(result, audio_path, self.output_dir, self.extension, SubtitleOptions(**(options or {}), **kwargs))

    def write_result(self, result: dict, file: TextIO, options: dict | None = None, **kwargs) -> None:
        file.write(render(result, self.extension, SubtitleOptions(**(options or {}), **kwargs)))


class WriteTXT(ResultWriter):
    extension = "txt"


class WriteVTT(ResultWriter):
    extension = "vtt"


class WriteSRT(ResultWriter):
    extension = "srt"


class WriteTSV(ResultWriter):
    extension = "tsv"


class WriteJSON(ResultWriter):
    extension = "json"


WRITERS: dict[str, type[ResultWriter]] = {
    cls.extension: cls for cls in (WriteTXT, WriteVTT, WriteSRT, WriteTSV, WriteJSON)
}


def get_writer(output_format: str, output_dir: str | os.PathLike) -> Callable[..., None]:
    """The writer of one format (txt, vtt, srt, tsv, json), or of all of them ("all")."""
    if output_format == "all":
        writers = [cls(output_dir) for cls in WRITERS.values()]

        def write_all(result: dict, audio_path: str | os.PathLike, options: dict | None = None, **kwargs) -> None:
            for writer in writers:
                writer(result, audio_path, options, **kwargs)

        return write_all
    if output_format not in WRITERS:
        raise ValueError(f"unknown output format {output_format!r}; use one of {', '.join(FORMATS)} or all")
    return WRITERS[output_format](output_dir)
