"""The transcript library: every transcript the page made, kept on this computer.

One SQLite file in the user's data folder (``$XDG_DATA_HOME/menny`` or ``~/.local/share/menny``)
holds each transcript with its source, model, settings, segments and words, times, and the link to
the audio it was made from (a 16 kHz WAV beside the database, and the server's clip id when it
came from the server). It survives reloads of the page and restarts of the app; several page
sessions (browser tabs) share it, which write-ahead logging allows while one of them writes.

The schema is versioned (SQLite's ``user_version``); ``MIGRATIONS[n]`` takes a database from
version n to n + 1, so a library made by an older Menny is brought up to date when opened.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePath

import numpy as np

from menny.wav import wav_bytes, wav_samples
from whisper.writers import render

EXPORT_FORMATS = {
    "txt": "text/plain",
    "srt": "application/x-subrip",
    "vtt": "text/vtt",
    "json": "application/json",
}


def default_folder() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "menny"


def new_uid() -> str:
    return uuid.uuid4().hex[:12]


def _version_1(db: sqlite3.Connection) -> None:
    """The first layout: transcripts only."""
    db.execute(
        """CREATE TABLE transcripts (
            id INTEGER PRIMARY KEY,
            uid TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            source TEXT NOT NULL,
            model TEXT NOT NULL,
            settings TEXT NOT NULL,       -- JSON: language, task, word timings, beam size
            text TEXT NOT NULL,
            result TEXT NOT NULL,         -- JSON: whisper's result, segments with their words
            audio TEXT NOT NULL,          -- the WAV the model heard, relative to the library's folder
            n_mels INTEGER NOT NULL,
            duration_s REAL NOT NULL,
            transcribe_s REAL NOT NULL,
            created TEXT NOT NULL         -- ISO 8601, local time
        )"""
    )


def _version_2(db: sqlite3.Connection) -> None:
    """Full-text search, links to the server's clips, cancelled transcripts, preferences."""
    db.execute("ALTER TABLE transcripts ADD COLUMN clip_id TEXT")
    db.execute("ALTER TABLE transcripts ADD COLUMN cancelled_at_s REAL")  # NULL: transcribed to the end
    db.execute("CREATE INDEX transcripts_clip_id ON transcripts (clip_id)")
    db.execute(
        "CREATE VIRTUAL TABLE transcript_search USING fts5(text, content='transcripts', content_rowid='id')"
    )
    db.execute("INSERT INTO transcript_search (transcript_search) VALUES ('rebuild')")
    db.execute(
        """CREATE TRIGGER transcripts_added AFTER INSERT ON transcripts BEGIN
            INSERT INTO transcript_search (rowid, text) VALUES (new.id, new.text);
        END"""
    )
    db.execute(
        """CREATE TRIGGER transcripts_removed AFTER DELETE ON transcripts BEGIN
            INSERT INTO transcript_search (transcript_search, rowid, text) VALUES ('delete', old.id, old.text);
        END"""
    )
    db.execute("CREATE TABLE preferences (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_version_1, _version_2)
SCHEMA_VERSION = len(MIGRATIONS)


class LibraryTooNew(RuntimeError):
    """The library was written by a newer Menny, whose layout this one does not know."""


@dataclass(frozen=True)
class Transcript:
    """One transcript in the library."""

    name: str
    source: str  # where the speech came from, in words: "upload", "browser microphone", ...
    model: str
    settings: dict  # the transcription settings it was made with
    result: dict  # whisper.transcribe's result (for a cancelled one, the windows done)
    audio: Path  # the 16 kHz mono WAV the model heard
    n_mels: int  # of the model's input, for the spectrogram
    duration_s: float
    transcribe_s: float  # wall time of the transcription alone
    clip_id: str | None = None  # the server's clip it was made from
    cancelled_at_s: float | None = None  # where Cancel stopped it; None when it went to the end
    created: datetime = field(default_factory=datetime.now)
    uid: str = field(default_factory=new_uid)

    @property
    def text(self) -> str:
        return self.result["text"].strip()

    @property
    def language(self) -> str:
        return self.result.get("language") or "unknown"

    def wav(self) -> bytes:
        return self.audio.read_bytes()

    def samples(self) -> np.ndarray:
        return wav_samples(self.wav())

    def export(self, fmt: str) -> str:
        return render(self.result, fmt)

    def export_name(self, fmt: str) -> str:
        return f"{PurePath(self.name).stem or 'transcript'}.{fmt}"


def search_query(words: str) -> str:
    """An FTS5 query that finds every word typed, each also as the start of a longer word;
    quoted, so that a person's quotes, stars or keywords (OR, NEAR) are only text."""
    return " ".join('"' + word.replace('"', '""') + '"*' for word in words.split())


class Library:
    """The transcripts in `folder` (default: the user's data folder), newest first."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or default_folder()
        self.path = self.folder / "library.sqlite3"
        self.audio_folder = self.folder / "audio"
        self.audio_folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode = WAL")
            migrate(db)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # One connection per call: page sessions run in threads of their own.
        with closing(sqlite3.connect(self.path, timeout=30, isolation_level=None)) as db:
            db.row_factory = sqlite3.Row
            yield db

    def add(self, transcript: Transcript, audio: np.ndarray | None = None) -> Transcript:
        """Keeps `transcript`; `audio` (16 kHz samples) is written to its audio file first."""
        if audio is not None:
            transcript.audio.parent.mkdir(parents=True, exist_ok=True)
            transcript.audio.write_bytes(wav_bytes(audio))
        with self._connect() as db:
            db.execute(
                """INSERT INTO transcripts (uid, name, source, model, settings, text, result, audio, n_mels,
                duration_s, transcribe_s, created, clip_id, cancelled_at_s)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    transcript.uid, transcript.name, transcript.source, transcript.model,
                    json.dumps(transcript.settings), transcript.text, json.dumps(transcript.result),
                    str(transcript.audio.relative_to(self.folder)), transcript.n_mels, transcript.duration_s,
                    transcript.transcribe_s, transcript.created.isoformat(), transcript.clip_id,
                    transcript.cancelled_at_s,
                ),
            )
        return transcript

    def audio_path(self, uid: str) -> Path:
        return self.audio_folder / f"{uid}.wav"

    def _transcript(self, row: sqlite3.Row) -> Transcript:
        return Transcript(
            name=row["name"], source=row["source"], model=row["model"], settings=json.loads(row["settings"]),
            result=json.loads(row["result"]), audio=self.folder / row["audio"], n_mels=row["n_mels"],
            duration_s=row["duration_s"], transcribe_s=row["transcribe_s"], clip_id=row["clip_id"],
            cancelled_at_s=row["cancelled_at_s"], created=datetime.fromisoformat(row["created"]), uid=row["uid"],
        )

    def transcripts(self, search: str = "", limit: int = 50) -> list[Transcript]:
        """The newest `limit` transcripts, or those holding every word of `search`."""
        with self._connect() as db:
            if query := search_query(search):
                rows = db.execute(
                    """SELECT transcripts.* FROM transcript_search
                    JOIN transcripts ON transcripts.id = transcript_search.rowid
                    WHERE transcript_search MATCH ? ORDER BY transcripts.id DESC LIMIT ?""",
                    (query, limit),
                )
            else:
                rows = db.execute("SELECT * FROM transcripts ORDER BY id DESC LIMIT ?", (limit,))
            return [self._transcript(row) for row in rows]

    def get(self, uid: str) -> Transcript | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM transcripts WHERE uid = ?", (uid,)).fetchone()
        return self._transcript(row) if row else None

    def count(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT count(*) FROM transcripts").fetchone()[0]

    def transcribed_clips(self, clip_ids: list[str]) -> dict[str, str]:
        """{server clip id: uid of its newest transcript} for those of `clip_ids` transcribed."""
        with self._connect() as db:
            rows = db.execute(
                f"SELECT clip_id, uid FROM transcripts WHERE clip_id IN ({','.join('?' * len(clip_ids))}) ORDER BY id",
                clip_ids,
            )
            return {row["clip_id"]: row["uid"] for row in rows}

    def delete(self, uid: str) -> None:
        """Removes one transcript and its audio."""
        with self._connect() as db:
            row = db.execute("DELETE FROM transcripts WHERE uid = ? RETURNING audio", (uid,)).fetchone()
        if row:
            (self.folder / row["audio"]).unlink(missing_ok=True)

    def delete_all(self) -> None:
        with self._connect() as db:
            audio = [row["audio"] for row in db.execute("DELETE FROM transcripts RETURNING audio")]
        for path in audio:
            (self.folder / path).unlink(missing_ok=True)

    def preference(self, key: str) -> str | None:
        with self._connect() as db:
            row = db.execute("SELECT value FROM preferences WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else None

    def set_preference(self, key: str, value: str) -> None:
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO preferences (key, value) VALUES (?, ?)", (key, value))


def migrate(db: sqlite3.Connection) -> int:
    """Brings the database to SCHEMA_VERSION, each step in one transaction; the version reached."""
    while True:
        db.execute("BEGIN IMMEDIATE")  # one page session migrates; the others wait, then see it done
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            db.execute("ROLLBACK")
            raise LibraryTooNew(
                f"The transcript library was written by a newer Menny (schema {version}, this one knows "
                f"{SCHEMA_VERSION}): update Menny, or move the library aside to start a new one."
            )
        if version == SCHEMA_VERSION:
            db.execute("COMMIT")
            return version
        try:
            MIGRATIONS[version](db)
            db.execute(f"PRAGMA user_version = {version + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
