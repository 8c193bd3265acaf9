"""The transcript library (SQLite: schema, migrations, search, deletion, preferences) and the
transcription jobs that fill it (segments as they come, Cancel), with real speech and tiny.en."""

from __future__ import annotations

import json
import sqlite3
import threading
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from speech import clip, model, wer
from virtual_mic import wait_for

from menny.page.library import MIGRATIONS, SCHEMA_VERSION, Library, LibraryTooNew, Transcript, search_query
from menny.page.transcription import TranscriptionJob, TranscriptionSettings, WorkQueue
from menny.wav import wav_bytes
from whisper.audio import SAMPLE_RATE, load_audio

JFK = clip("jfk.flac")
TIMEOUT_S = 300.0  # a failure guard for a loaded machine, not a speed requirement


def transcript(library: Library, text: str, **fields) -> Transcript:
    uid = fields.pop("uid", None) or f"t{abs(hash(text)) % 10**10}"
    words = [
        {"word": f" {w}", "start": i / 10, "end": i / 10 + 0.1, "probability": 0.9} for i, w in enumerate(text.split())
    ]
    segments = [{"id": 0, "start": 0.0, "end": 1.0, "text": text, "words": words}]
    return Transcript(
        name=f"{uid}.wav", source="upload", model="tiny.en", settings={"language": "en"},
        result={"text": text, "segments": segments, "language": "en"}, audio=library.audio_path(uid),
        n_mels=80, duration_s=1.0, transcribe_s=0.1, uid=uid, **fields,
    )


def test_a_new_library_is_made_at_the_current_schema_with_wal(tmp_path: Path) -> None:
    library = Library(tmp_path)
    with sqlite3.connect(library.path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == len(MIGRATIONS)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert library.count() == 0 and library.transcripts() == [] and library.transcripts("anything") == []


def test_a_version_1_library_is_migrated_and_its_transcripts_become_searchable(tmp_path: Path) -> None:
    # A library as the first schema left it, holding one transcript.
    with sqlite3.connect(tmp_path / "library.sqlite3") as db:
        MIGRATIONS[0](db)
        db.execute("PRAGMA user_version = 1")
        result = {"text": " And so my fellow Americans", "segments": [], "language": "en"}
        db.execute(
            "INSERT INTO transcripts (uid, name, source, model, settings, text, result, audio, n_mels, duration_s, "
            "transcribe_s, created) VALUES ('old1', 'jfk.flac', 'upload', 'base', '{}', ?, ?, 'audio/old1.wav', 80, "
            "11.0, 1.5, '2025-01-02T13:04:05')",
            (result["text"], json.dumps(result)),
        )
    library = Library(tmp_path)
    [found] = library.transcripts("fellow")
    assert found.uid == "old1" and found.created == datetime(2025, 1, 2, 13, 4, 5)
    assert found.clip_id is None and found.cancelled_at_s is None
    library.set_preference("input_device", "pulse")  # the newer tables exist
    assert Library(tmp_path).preference("input_device") == "pulse"  # and opening again changes nothing


def test_a_library_from_a_newer_menny_is_refused_untouched(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "library.sqlite3") as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(LibraryTooNew, match="newer Menny"):
        Library(tmp_path)


def test_search_delete_links_and_preferences(tmp_path: Path) -> None:
    library = Library(tmp_path)
    first = library.add(transcript(library, "ask not what your country can do"), np.zeros(1600, np.float32))
    second = library.add(transcript(library, "my fellow Americans", clip_id="20250102-130405-123456"))
    assert first.audio.read_bytes() == wav_bytes(np.zeros(1600, np.float32))
    assert [t.uid for t in library.transcripts()] == [second.uid, first.uid]  # newest first
    assert [t.uid for t in library.transcripts("fellow")] == [second.uid]
    assert [t.uid for t in library.transcripts("COUNT")] == [first.uid]  # any case, a word's start
    assert library.transcripts("fellow country") == []  # every word
    assert library.transcripts('" OR NEAR( *') == []  # a person's syntax is only text
    assert search_query('say "hi"') == '"say"* """hi"""*'
    assert library.get(second.uid).result["segments"][0]["words"][1]["word"] == " fellow"
    assert library.transcribed_clips(["20250102-130405-123456", "other"]) == {"20250102-130405-123456": second.uid}
    library.delete(first.uid)
    assert not first.audio.exists() and library.transcripts("country") == [] and library.count() == 1
    library.delete_all()
    assert library.count() == 0 and library.transcripts("fellow") == []
    assert library.preference("input_device") is None
    library.set_preference("input_device", "pulse")
    library.set_preference("input_device", "default")
    assert library.preference("input_device") == "default"


def test_sessions_write_at_once(tmp_path: Path) -> None:
    libraries = [Library(tmp_path) for _ in range(4)]

    def write(n: int) -> None:
        for i in range(10):
            libraries[n].add(transcript(libraries[n], f"words {n} {i}", uid=f"u{n}x{i}"))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert Library(tmp_path).count() == 40


def test_a_job_keeps_its_transcript_with_its_audio_and_settings(tmp_path: Path) -> None:
    library = Library(tmp_path)
    settings = TranscriptionSettings(model="tiny.en", word_timestamps=True)
    job = TranscriptionJob(model("tiny.en"), settings, library, JFK.path.read_bytes(), name=JFK.file, source="upload")
    assert job.wait(TIMEOUT_S) and job.error is None
    kept = library.get(job.transcript.uid)
    assert wer([JFK.transcript], [kept.text]) <= 10.0, kept.text
    assert kept.settings["word_timestamps"] and kept.result["segments"][0]["words"]
    assert kept.cancelled_at_s is None and kept.duration_s == pytest.approx(JFK.duration, abs=0.05)
    assert np.allclose(kept.samples(), load_audio(JFK.path), atol=1 / 32768)
    assert job.segments == kept.result["segments"]  # the segments shown while it ran are the transcript's
    assert "-->" in kept.export("srt") and json.loads(kept.export("json"))["text"] == kept.result["text"]
    assert kept.export_name("vtt") == "jfk.vtt"


def test_cancel_stops_between_windows_and_keeps_what_is_done(tmp_path: Path) -> None:
    library = Library(tmp_path)
    speech = load_audio(clip("librivox_sns01_0870.wav").path)
    long = np.concatenate([speech] * (150 * SAMPLE_RATE // speech.size + 1))  # about 2.5 minutes: 5+ windows
    queue = WorkQueue(library)
    queue.submit(
        "long", model=model("tiny.en"), settings=TranscriptionSettings(model="tiny.en"),
        data=wav_bytes(long), name="long.wav", source="upload",
    )
    queue.submit("next", model=model("tiny.en"), settings=TranscriptionSettings(model="tiny.en"),
                 data=JFK.path.read_bytes(), name=JFK.file, source="upload")
    job = queue.current
    wait_for(lambda: job.segments, "the first window's segments", TIMEOUT_S)
    assert job.done_s < long.size / SAMPLE_RATE
    queue.cancel()
    assert job.wait(TIMEOUT_S) and not queue.busy and queue.pending == 0
    kept = library.get(job.transcript.uid)
    assert 0 < kept.cancelled_at_s < long.size / SAMPLE_RATE - 30
    assert kept.result["segments"] == job.segments and kept.text
    assert kept.duration_s == pytest.approx(long.size / SAMPLE_RATE, abs=0.01)  # the whole audio stays linked
    assert queue.outcomes == {"long": queue.outcomes["long"]} and queue.outcomes["long"].transcript_uid == kept.uid

