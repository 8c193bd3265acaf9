"""An archive of recordings and its transcripts: which files there are, which are done,
and outputs written so that a crash never leaves half a file that counts as done.

Audio `IN/talks/ep1.mp3` is transcribed into `OUT/talks/ep1.mp3.json` (the result, the
file's name and duration), plus `OUT/talks/ep1.mp3.srt` and so on for the formats asked
for.  The full name is kept so that `ep1.mp3` and `ep1.wav` never share a transcript.
The JSON is written last, each output through a temporary file and a rename: a file
counts as done exactly when its JSON exists.  A file that cannot be transcribed gets a
line in `OUT/failures.jsonl` with the reason.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..models import write_atomically
from ..writers import FORMATS, SubtitleOptions, render

# What FFmpeg commonly holds speech in; anything else under IN (notes, images) is left alone.
AUDIO_SUFFIXES = frozenset(
    {".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".oga", ".opus", ".webm", ".mp4", ".m4v", ".mkv", ".mka"}
    | {".mov", ".avi", ".wma", ".aif", ".aiff", ".amr", ".3gp"}
)
FAILURES = "failures.jsonl"
# write_atomically's temporary files: `.<output name>.<8 random characters>`.
_PARTIAL = re.compile(rf"^\..+\.({'|'.join(FORMATS)})\.[a-z0-9_]{{8}}$")


def list_audio(in_dir: Path) -> list[str]:
    """The audio and video files under `in_dir`, as sorted POSIX paths relative to it
    (hidden files and folders skipped)."""
    names = []
    for folder, subfolders, files in os.walk(in_dir):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        relative = Path(folder).relative_to(in_dir)
        for file in files:
            if not file.startswith(".") and Path(file).suffix.lower() in AUDIO_SUFFIXES:
                names.append((relative / file).as_posix())
    return sorted(names)


@dataclass(frozen=True)
class Archive:
    """The input folder, the output folder, and what is written for each file."""

    in_dir: Path
    out_dir: Path
    formats: tuple[str, ...] = ()  # besides the JSON
    subtitles: SubtitleOptions = field(default_factory=SubtitleOptions)

    def source(self, name: str) -> Path:
        return self.in_dir / name

    def output(self, name: str, fmt: str) -> Path:
        return self.out_dir / f"{name}.{fmt}"

    def is_done(self, name: str) -> bool:
        return self.output(name, "json").exists()

    def write(self, name: str, result: dict, duration: float) -> None:
        """Write a file's outputs, the JSON last; each appears whole or not at all."""
        for fmt in self.formats:
            if fmt != "json":
                _write_text(self.output(name, fmt), render(result, fmt, self.subtitles))
        _write_text(self.output(name, "json"), render({"audio": name, "duration": duration, **result}, "json"))

    def record_failure(self, name: str, reason: str) -> None:
        """Append one line to failures.jsonl; the last line about a file is its state."""
        line = json.dumps({"audio": name, "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / FAILURES, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def failures(self) -> dict[str, str]:
        """The files that failed and are still not done, with their last reason."""
        path = self.out_dir / FAILURES
        if not path.exists():
            return {}
        reasons = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                reasons[record["audio"]] = record["reason"]
        return {name: reason for name, reason in reasons.items() if not self.is_done(name)}

    def remove_partials(self) -> int:
        """Delete temporary files that a killed run left behind; how many there were."""
        removed = 0
        for folder, _, files in os.walk(self.out_dir):
            for file in files:
                if _PARTIAL.match(file):
                    os.unlink(os.path.join(folder, file))
                    removed += 1
        return removed


def _write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))


@dataclass(frozen=True)
class Plan:
    """What a run has to do: the files not done yet, and those it leaves alone."""

    todo: list[str]
    done: int  # transcribed by an earlier run
    failed: dict[str, str]  # failed in an earlier run and not retried: name -> reason


def plan(archive: Archive, *, retry_failed: bool = False) -> Plan:
    """List the archive and sort each file into done, failed before, or to do."""
    names = list_audio(archive.in_dir)
    failed = {} if retry_failed else archive.failures()
    todo = [name for name in names if name not in failed and not archive.is_done(name)]
    done = len(names) - len(todo) - sum(1 for name in names if name in failed)
    return Plan(todo, done, {name: reason for name, reason in failed.items() if name in names})
