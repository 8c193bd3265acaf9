"""The microphone server's building blocks, without a microphone: WAV files that survive a
crash, the clip folder (ids, retention), levels, the resampler and the security settings."""

from __future__ import annotations

import math
import os
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
from speech import SPEECH_DIR
from virtual_mic import locate, read_wav

from audio_server import InsecureConfig, ServerConfig, check_security
from menny.server.clips import ClipBusy, ClipNotFound, ClipStore
from menny.server.levels import LEVEL_FLOOR_DBFS, peak_dbfs, rms_dbfs
from menny.server.recorder import StreamResampler
from menny.server.wav_file import WavAppender, read_wav_prefix, repair_wav
from menny.wav import HEADER_BYTES

SPEECH = "ls_1272-128104-0000.wav"


def test_wav_appender_file_is_complete_after_every_append(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    rng = np.random.default_rng(0)
    appender = WavAppender(path)
    written = np.zeros(0, np.int16)
    for size in (0, 1, 160, 1600, 7):
        block = rng.integers(-32768, 32767, size, dtype=np.int16)
        appender.append(block)
        written = np.concatenate([written, block])
        # Read while the writer still holds the file open, as after a kill.
        samples, rate = read_wav(path)
        assert rate == 16000
        np.testing.assert_array_equal(samples, written)
    appender.close()
    assert read_wav(path)[0].size == 1768


def test_wav_appender_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        WavAppender(path)
    assert path.read_bytes() == b"precious"


def test_repair_recovers_samples_written_after_the_last_header_update(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    appender = WavAppender(path)
    appender.append(np.arange(100, dtype=np.int16))
    appender.close()
    # What a kill between the samples' write and the header's update leaves: more samples than
    # the header says, and half a sample.
    with open(path, "ab") as f:
        f.write(np.arange(100, 150, dtype="<i2").tobytes() + b"\x01")
    assert read_wav(path)[0].size == 100
    assert repair_wav(path) == 150
    np.testing.assert_array_equal(read_wav(path)[0], np.arange(150))
    assert path.stat().st_size == HEADER_BYTES + 300


def test_repair_leaves_foreign_files_alone(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    with wave.open(str(path), "wb") as w:  # stereo: not the layout the recorder writes
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0" * 400)
    before = path.read_bytes()
    assert repair_wav(path) is None
    assert path.read_bytes() == before


def test_prefix_of_a_growing_file(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    appender = WavAppender(path)
    appender.append(np.arange(1000, dtype=np.int16))
    np.testing.assert_array_equal(read_wav(read_wav_prefix(path, 400))[0], np.arange(400))
    # From a start sample on: what a follower has not fetched yet; nothing past the end.
    np.testing.assert_array_equal(read_wav(read_wav_prefix(path, 1000, start=600))[0], np.arange(600, 1000))
    assert read_wav(read_wav_prefix(path, 400, start=600))[0].size == 0
    appender.close()


def _make_clip(store: ClipStore, n_frames: int) -> str:
    clip_id, path = store.reserve()
    appender = WavAppender(path)
    appender.append(np.zeros(n_frames, np.int16))
    appender.close()
    store.release(clip_id)
    return clip_id


def test_clip_ids_grow_and_cannot_escape_the_folder(tmp_path: Path) -> None:
    store = ClipStore(tmp_path / "clips")
    ids = [store.reserve()[0] for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    secret = tmp_path / "secret.wav"
    secret.write_bytes(b"x")
    for bad in ("../secret", "..", "", "a/b", "20250101-000000-000000/../../secret",
                "/etc/passwd", "20250101-000000-00000", "20250101-000000-000000.wav"):
        with pytest.raises(ValueError):
            store.path_for(bad)
        with pytest.raises(ValueError):
            store.delete(bad)
    assert secret.exists()


def test_busy_clips_are_hidden_until_released(tmp_path: Path) -> None:
    store = ClipStore(tmp_path)
    clip_id, path = store.reserve()
    WavAppender(path).close()
    assert store.list() == [] and store.latest() is None
    with pytest.raises(ClipBusy):
        store.get(clip_id)
    with pytest.raises(ClipBusy):
        store.delete(clip_id)
    store.release(clip_id)
    assert store.get(clip_id).duration_s == 0.0
    store.delete(clip_id)
    with pytest.raises(ClipNotFound):
        store.get(clip_id)


def test_retention_removes_oldest_first_and_keeps_the_newest(tmp_path: Path) -> None:
    store = ClipStore(tmp_path, max_clips=3)
    ids = [_make_clip(store, 16) for _ in range(5)]
    assert store.enforce_retention() == ids[:2]
    assert [c.id for c in store.list()] == ids[2:]

    by_size = ClipStore(tmp_path / "b", max_clips=100, max_bytes=3 * (HEADER_BYTES + 2000))
    ids = [_make_clip(by_size, 1000) for _ in range(5)]
    by_size.enforce_retention()
    assert [c.id for c in by_size.list()] == ids[2:]
    # A clip bigger than the whole allowance is still kept while it is the newest.
    big = _make_clip(by_size, 10_000)
    by_size.enforce_retention()
    assert [c.id for c in by_size.list()] == [big]


def test_store_repairs_clips_left_by_a_crash(tmp_path: Path) -> None:
    store = ClipStore(tmp_path)
    clip_id = _make_clip(store, 10)
    with open(store.path_for(clip_id), "ab") as f:
        f.write(b"\1\0" * 5)
    assert ClipStore(tmp_path).get(clip_id).duration_s == 15 / 16000
    assert read_wav(store.path_for(clip_id))[0].size == 15


def test_levels() -> None:
    t = np.arange(16000) / 16000
    sine = np.sin(2 * math.pi * 440 * t).astype(np.float32)
    assert rms_dbfs(sine) == pytest.approx(-3.01, abs=0.01)
    assert peak_dbfs(sine) == pytest.approx(0.0, abs=0.01)
    assert rms_dbfs(0.1 * sine) == pytest.approx(-23.01, abs=0.01)
    assert rms_dbfs(np.zeros(100, np.float32)) == LEVEL_FLOOR_DBFS
    assert peak_dbfs(np.zeros(0, np.float32)) == LEVEL_FLOOR_DBFS


def test_resampler_converts_real_speech_back_to_16k(tmp_path: Path) -> None:
    """Speech taken to 48 kHz by sox, then back by our streaming resampler in odd-sized blocks
    (as a device that cannot do 16 kHz delivers it), matches the original."""
    original, _ = read_wav(SPEECH_DIR / SPEECH)
    at48k = tmp_path / "48k.wav"
    subprocess.run(["sox", str(SPEECH_DIR / SPEECH), "-r", "48000", str(at48k)], check=True)
    x48, rate = read_wav(at48k)
    assert rate == 48000
    resampler = StreamResampler(48000)
    pieces = []
    floats = x48.astype(np.float32) / 32768
    for start in range(0, len(floats), 1021):
        pieces.append(resampler.process(floats[start : start + 1021]))
    pieces.append(resampler.flush())
    back = np.concatenate(pieces)
    assert abs(len(back) - len(original)) <= 2
    back16 = np.clip(np.rint(back * 32768), -32768, 32767)
    offset, correlation, _ = locate(np.concatenate([back16, np.zeros(64)]), original[:-64])
    assert offset == 0
    assert correlation >= 0.99


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        (ServerConfig(host="0.0.0.0"), "set a token"),
        (ServerConfig(host="192.168.1.5"), "set a token"),
        (ServerConfig(host="myhost.example"), "set a token"),
        (ServerConfig(token="short"), "at least 16"),
        (ServerConfig(allowed_origins=("*",)), "any web site"),
    ],
)
def test_insecure_settings_are_refused(settings: ServerConfig, problem: str) -> None:
    with pytest.raises(InsecureConfig, match=problem):
        check_security(settings)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_token(host: str) -> None:
    check_security(ServerConfig(host=host))
    check_security(ServerConfig(host="0.0.0.0", token=os.urandom(12).hex()))
