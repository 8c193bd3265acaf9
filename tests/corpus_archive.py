"""An archive of dev clips for the corpus tests, and the text `transcribe` gives each clip."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from speech import english_clips, model

from whisper.cli import transcribe_options
from whisper.corpus.cli import build_parser
from whisper.transcribe import transcribe_with

MODEL = "tiny.en"
# Greedy, to keep CI short; the temperature fallback stays as the command line has it.
OPTIONS = ["--model", MODEL, "--beam-size", "None"]
CLIPS = english_clips()[:20]
IN_SUB = {clip.file for clip in CLIPS[-4:]}  # these go into a subfolder
BROKEN = {"broken.wav": b"RIFF, but no audio follows", "empty.flac": b""}


def clip_name(clip) -> str:
    return f"sub/{clip.file}" if clip.file in IN_SUB else clip.file


def make_archive(root: Path, clips=CLIPS, *, broken: bool = True) -> Path:
    """A folder of the clips (some in a subfolder), two unreadable files and a note that is no audio."""
    root.mkdir(parents=True)
    (root / "sub").mkdir()
    for clip in clips:
        os.symlink(clip.path, root / clip_name(clip))
    if broken:
        for name, content in BROKEN.items():
            (root / name).write_bytes(content)
    (root / "notes.txt").write_text("not audio: left alone\n")
    return root


@functools.cache
def transcribe_texts() -> dict[str, str]:
    """What `whisper.transcribe` gives each clip with the options the corpus runs use."""
    args = build_parser().parse_args(["in", "out", *OPTIONS])
    options = transcribe_options(args, multilingual=False)
    return {clip_name(clip): transcribe_with(model(MODEL), str(clip.path), options)["text"] for clip in CLIPS}


def written_texts(out: Path) -> dict[str, str]:
    """Each JSON's text in OUT, by the audio's name under IN."""
    texts = {}
    for path in out.rglob("*.json"):
        record = json.loads(path.read_text())
        assert path == out / f"{record['audio']}.json"
        texts[record["audio"]] = record["text"]
    return texts


def leftovers(out: Path) -> list[Path]:
    """Temporary files of unfinished writes."""
    return [path for path in out.rglob(".*") if path.is_file()]
