"""Audio in: formats, odd and bad files, long silence."""

from __future__ import annotations

import tracemalloc
import wave

import av
import numpy as np
import pytest
from speech import SPEECH_DIR, model

import whisper
from whisper.audio import (
    FRAMES_PER_BLOCK,
    HOP_LENGTH,
    N_FFT,
    SAMPLE_RATE,
    AudioError,
    load_audio,
    log_mel_frames,
    log_mel_spectrogram,
    pad_or_trim,
    power_spectrum,
)


def _encode(path, samples: np.ndarray, rate: int, codec: str, layout: str = "mono") -> None:
    """Write `samples` (channels, n) float32 with PyAV."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(samples.astype(np.float32), format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _write_wav(path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def test_load_audio_resamples_to_16k_mono():
    audio = load_audio(SPEECH_DIR / "jfk.flac")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) / SAMPLE_RATE - 11.0) < 0.01
    assert 0.3 < np.abs(audio).max() <= 1.0


def test_stereo_44k_mp3(tmp_path):
    speech = load_audio(SPEECH_DIR / "jfk.flac")
    resampled = np.interp(np.arange(0, len(speech), SAMPLE_RATE / 44100), np.arange(len(speech)), speech)
    path = tmp_path / "stereo.mp3"
    _encode(path, np.stack([resampled, resampled]), 44100, "mp3", "stereo")
    with av.open(str(path)) as container:
        assert container.streams.audio[0].channels == 2
        assert container.streams.audio[0].sample_rate == 44100
    result = whisper.transcribe(model("tiny.en"), str(path))
    assert "ask not what your country can do for you" in result["text"].lower()


def test_wrong_extension_is_read_by_content(tmp_path):
    path = tmp_path / "actually_flac.wav"
    path.write_bytes((SPEECH_DIR / "jfk.flac").read_bytes())
    np.testing.assert_array_equal(load_audio(path), load_audio(SPEECH_DIR / "jfk.flac"))


def test_bytes_are_accepted():
    data = (SPEECH_DIR / "jfk.flac").read_bytes()
    np.testing.assert_array_equal(load_audio(data), load_audio(SPEECH_DIR / "jfk.flac"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"This is a text file, not a recording.\n" * 50, "not a readable audio or video file"),
        (bytes(range(256)) * 64, "not a readable audio or video file"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "clip.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match=message):
        load_audio(path)
    with pytest.raises(AudioError, match=message):
        whisper.transcribe(model("tiny.en"), str(path))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        load_audio(tmp_path / "nothing.wav")


def test_video_without_sound_track(tmp_path):
    path = tmp_path / "silent_video.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(AudioError, match="no sound track"):
        load_audio(path)


def test_zero_sample_wav(tmp_path):
    path = tmp_path / "empty.wav"
    _write_wav(path, np.zeros(0))
    assert load_audio(path).shape == (0,)
    result = whisper.transcribe(model("tiny.en"), str(path))
    assert result == {"text": "", "segments": [], "language": "en"}


def test_very_short_clip(tmp_path):
    path = tmp_path / "click.wav"
    _write_wav(path, np.array([0.5, -0.5, 0.25]))
    assert log_mel_spectrogram(load_audio(path)).shape[0] == 80
    assert whisper.transcribe(model("tiny.en"), str(path))["segments"] == []


def test_ten_minutes_of_silence_invent_no_text(tmp_path):
    path = tmp_path / "silence.wav"
    _write_wav(path, np.zeros(10 * 60 * SAMPLE_RATE))
    seen = []
    result = whisper.transcribe(model("tiny.en"), str(path), progress_callback=lambda done, total: seen.append(done))
    assert result["text"].strip() == ""
    assert seen[-1] == pytest.approx(600.0)
    assert seen == sorted(seen)


def test_mel_shapes_and_padding():
    audio = load_audio(SPEECH_DIR / "jfk.flac")
    assert log_mel_spectrogram(audio).shape == (80, 1100)
    assert log_mel_spectrogram(audio, n_mels=128).shape == (128, 1100)
    assert pad_or_trim(audio).shape == (480000,)
    assert pad_or_trim(np.ones(600000)).shape == (480000,)


def test_mel_of_long_audio_is_computed_in_blocks_with_the_same_values():
    rng = np.random.default_rng(3)
    audio = (rng.standard_normal(10 * 60 * SAMPLE_RATE) * 0.1).astype(np.float32)
    tracemalloc.start()
    mel = log_mel_frames(audio)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # All frames at once would take ~200 MB of temporary arrays for ten minutes.
    assert peak < audio.nbytes + 2 * mel.nbytes + 16 * 2**20
    # Frames on either side of a block boundary are the frames themselves, transformed alone.
    spectrum = power_spectrum(audio[: 25 * SAMPLE_RATE])
    padded = np.pad(audio[: 25 * SAMPLE_RATE], (N_FFT // 2, N_FFT // 2), mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)
    for i in (0, FRAMES_PER_BLOCK - 1, FRAMES_PER_BLOCK, 2 * FRAMES_PER_BLOCK + 1, len(spectrum) - 1):
        frame = padded[i * HOP_LENGTH : i * HOP_LENGTH + N_FFT] * window.astype(np.float32)
        np.testing.assert_allclose(spectrum[i], np.abs(np.fft.rfft(frame)) ** 2, rtol=1e-4, atol=1e-9)
