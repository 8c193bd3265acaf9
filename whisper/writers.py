"""Write a transcription result as text, subtitles (SRT, WebVTT), TSV or JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("txt", "vtt", "srt", "tsv", "json")


@dataclass(frozen=True)
class SubtitleOptions:
    """How word-timed subtitles are cut; without word timings each segment is one cue."""

    max_line_width: int | None = None  # characters per line
    max_line_count: int | None = None  # lines per cue (needs max_line_width)
    max_words_per_line: int | None = None
    highlight_words: bool = False  # one cue per word, the spoken word underlined


def format_timestamp(seconds: float, always_include_hours: bool = False, decimal_marker: str = ".") -> str:
    """`[HH:]MM:SS.mmm`, as subtitles and console output show times."""
    milliseconds = round(seconds * 1000.0)
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    whole_seconds, milliseconds = divmod(milliseconds, 1_000)
    hours_part = f"{hours:02d}:" if always_include_hours or hours else ""
    return f"{hours_part}{minutes:02d}:{whole_seconds:02d}{decimal_marker}{milliseconds:03d}"


@dataclass
class Cue:
    start: float
    end: float
    text: str


def _word_lines(words: list[dict], options: SubtitleOptions) -> Iterator[list[dict]]:
    """Words grouped into lines no wider than max_line_width and no longer than max_words_per_line."""
    line: list[dict] = []
    width = 0
    for word in words:
        text = word["word"].strip()
        too_wide = options.max_line_width is not None and line and width + 1 + len(text) > options.max_line_width
        too_many = options.max_words_per_line is not None and len(line) >= options.max_words_per_line
        if line and (too_wide or too_many):
            yield line
            line, width = [], 0
        width += len(text) + (1 if line else 0)
        line.append(word)
    if line:
        yield line


def _word_cues(segment: dict, options: SubtitleOptions) -> Iterator[Cue]:
    lines = list(_word_lines(segment["words"], options))
    per_cue = (options.max_line_count or len(lines)) if options.max_line_width else len(lines)
    for first in range(0, len(lines), max(per_cue, 1)):
        group = lines[first : first + per_cue]
        words = [w for line in group for w in line]
        if not options.highlight_words:
            text = "\n".join(" ".join(w["word"].strip() for w in line) for line in group)
            yield Cue(words[0]["start"], words[-1]["end"], text)
            continue
        for current in words:
            text = "\n".join(
                " ".join(f"<u>{w['word'].strip()}</u>" if w is current else w["word"].strip() for w in line)
                for line in group
            )
            yield Cue(current["start"], current["end"], text)


def cues(result: dict, options: SubtitleOptions = SubtitleOptions()) -> list[Cue]:
    """Subtitle cues of a result: per segment, or cut by the options when words are timed."""
    word_options = (
        options.max_line_width or options.max_words_per_line or options.max_line_count or options.highlight_words
    )
    out: list[Cue] = []
    for segment in result["segments"]:
        if word_options and segment.get("words"):
            out.extend(_word_cues(segment, options))
        elif segment["text"].strip():
            out.append(Cue(segment["start"], segment["end"], segment["text"].strip().replace("-->", "->")))
    return out


def _srt(result: dict, options: SubtitleOptions) -> str:
    blocks = []
    for index, cue in enumerate(cues(result, options), start=1):
        start = format_timestamp(cue.start, always_include_hours=True, decimal_marker=",")
        end = format_timestamp(cue.end, always_include_hours=True, decimal_marker=",")
        blocks.append(f"{index}\n{start} --> {end}\n{cue.text}\n")
    return "\n".join(blocks)


def _vtt(result: dict, options: SubtitleOptions) -> str:
    blocks = ["WEBVTT\n"]
    for cue in cues(result, options):
        blocks.append(f"{format_timestamp(cue.start)} --> {format_timestamp(cue.end)}\n{cue.text}\n")
    return "\n".join(blocks)


def _tsv(result: dict) -> str:
    """Start and end in integer milliseconds, then the text, as openai-whisper writes it."""
    rows = ["start\tend\ttext"]
    for segment in result["segments"]:
        text = " ".join(segment["text"].split())  # one row: tabs and line breaks become spaces
        rows.append(f"{round(1000 * segment['start'])}\t{round(1000 * segment['end'])}\t{text}")
    return "\n".join(rows) + "\n"


def _txt(result: dict) -> str:
    return "".join(segment["text"].strip() + "\n" for segment in result["segments"] if segment["text"].strip())


def render(result: dict, fmt: str, options: SubtitleOptions = SubtitleOptions()) -> str:
    """The result as one format's text."""
    if fmt == "txt":
        return _txt(result)
    if fmt == "srt":
        return _srt(result, options)
    if fmt == "vtt":
        return _vtt(result, options)
    if fmt == "tsv":
        return _tsv(result)
    if fmt == "json":
        return json.dumps(result, ensure_ascii=False)
    raise ValueError(f"unknown output format {fmt!r}; use one of {', '.join(FORMATS)} or all")


def write_result(
    result: dict, audio_path: str | os.PathLike, output_dir: str | os.PathLike, fmt: str, options: SubtitleOptions
) -> list[Path]:
    """Write `<output_dir>/<audio stem>.<fmt>` (every format for "all"); return the paths."""
    formats = FORMATS if fmt == "all" else (fmt,)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for one in formats:
        path = output_dir / f"{Path(audio_path).stem}.{one}"
        path.write_text(render(result, one, options), encoding="utf-8")
        paths.append(path)
    return paths
