"""The shared speech clips (../shared/data/speech), a WER that normalises both sides, and an offline
Hugging Face cache for the loading tests."""

from __future__ import annotations

import csv
import functools
import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEECH_DIR = REPO.parent / "shared" / "data" / "speech"


@dataclass(frozen=True)
class Clip:
    file: str
    language: str
    duration: float
    transcript: str

    @property
    def path(self) -> Path:
        return SPEECH_DIR / self.file


@functools.cache
def clips() -> tuple[Clip, ...]:
    with open(SPEECH_DIR / "manifest.tsv", newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return tuple(Clip(r["file"], r["language"], float(r["duration_s"]), r["transcript"]) for r in rows)


def english_clips() -> list[Clip]:
    return [clip for clip in clips() if clip.language == "en"]


def other_language_clips() -> list[Clip]:
    return [clip for clip in clips() if clip.language != "en"]


def clip(name: str) -> Clip:
    return next(c for c in clips() if c.file == name)


@functools.cache
def _normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    return _normalizer()(text)


def wer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus word error rate in percent, both sides through Whisper's English normaliser."""
    import jiwer

    return 100 * jiwer.wer([normalize(r) for r in references], [normalize(h) for h in hypotheses])


@functools.cache
def model(name: str):
    """Each model is loaded once per test process."""
    import whisper

    return whisper.load_model(name)


def offline_hub(hub: Path, repo_id: str, files: list[Path]) -> dict[str, str]:
    """A Hugging Face cache under `hub` holding one snapshot of `repo_id` with `files` (linked),
    and an environment in which huggingface_hub reads it offline."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for file in files:
        os.symlink(file, snapshot / file.name)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}
