"""Audio in: decode any file FFmpeg reads, then Whisper's log-mel spectrogram."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from functools import cache

import av
import mlx.core as mx
import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE
N_FRAMES = N_SAMPLES // HOP_LENGTH
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH
N_SAMPLES_PER_TOKEN = HOP_LENGTH * 2
TOKENS_PER_SECOND = SAMPLE_RATE // N_SAMPLES_PER_TOKEN


class AudioError(ValueError):
    """Audio that cannot be decoded, with a message a person can act on."""


AudioSource = str | os.PathLike | bytes | bytearray | io.IOBase


def _open_container(file: object) -> av.container.InputContainer:
    """The file opened by PyAV, its metadata's undecodable bytes ignored where PyAV takes that
    option (PyAV 19 no longer does)."""
    try:
        return av.open(file, metadata_errors="ignore")
    except TypeError:
        return av.open(file)


def load_audio(file: AudioSource, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio stream of a file (or its bytes) to mono float32 at `sr` Hz.

    Samples pass through 16-bit integers, as with the reference's ffmpeg pipe, so that
    both see the same numbers.
    """
    name = os.fspath(file) if isinstance(file, (str, os.PathLike)) else "the upload"
    if isinstance(file, (bytes, bytearray)):
        if not file:
            raise AudioError("the file is empty: record or choose a file that contains sound")
        file = io.BytesIO(file)
    elif isinstance(file, (str, os.PathLike)):
        if not os.path.exists(file):
            raise AudioError(f"{name}: no such file")
        if os.path.getsize(file) == 0:
            raise AudioError(f"{name}: the file is empty: record or choose a file that contains sound")
    try:
        with _open_container(file) as container:
            if not container.streams.audio:
                raise AudioError(f"{name}: the file has no sound track")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=sr)
            chunks = []
            for frame in container.decode(stream):
                chunks.extend(resampled.to_ndarray().reshape(-1) for resampled in resampler.resample(frame))
            chunks.extend(resampled.to_ndarray().reshape(-1) for resampled in resampler.resample(None))
    except AudioError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError, OSError) as error:
        raise AudioError(
            f"{name}: not a readable audio or video file ({error.__class__.__name__}). "
            "Use WAV, FLAC, MP3, M4A, OGG, Opus, WebM or MP4."
        ) from None
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32) / 32768.0


def pad_or_trim(array, length: int = N_SAMPLES, *, axis: int = -1):
    """Cut or zero-pad `array` along `axis` to `length`, for numpy or MLX arrays."""
    size = array.shape[axis]
    if size > length:
        index = [slice(None)] * array.ndim
        index[axis] = slice(0, length)
        return array[tuple(index)]
    if size < length:
        widths = [(0, 0)] * array.ndim
        widths[axis] = (0, length - size)
        return mx.pad(array, widths) if isinstance(array, mx.array) else np.pad(array, widths)
    return array


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, log_step = min_log_hz / f_sp, np.log(6.4) / 27.0
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / f_sp
    logarithmic = min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / log_step
    return np.where(hz >= min_log_hz, logarithmic, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, log_step = min_log_hz / f_sp, np.log(6.4) / 27.0
    linear = f_sp * mel
    logarithmic = min_log_hz * np.exp(log_step * (mel - min_log_mel))
    return np.where(mel >= min_log_mel, logarithmic, linear)


@cache
def mel_filters(n_mels: int) -> np.ndarray:
    """Slaney-normalised triangular mel filters, (n_mels, 1 + N_FFT // 2), as librosa makes them."""
    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, 1 + N_FFT // 2)
    mel_points = np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), n_mels + 2)
    hz_points = _mel_to_hz(mel_points)
    widths = np.diff(hz_points)
    ramps = hz_points[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (hz_points[2:] - hz_points[:-2]))[:, None]
    return weights.astype(np.float32)


@cache
def _hann_window() -> np.ndarray:
    # Periodic, as torch.hann_window's default.
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)


# Frames transformed at a time: the STFT's temporary arrays stay small however long the audio
# (all at once, they grew with it, and the heap kept them; bench/NOTES.md).
FRAMES_PER_BLOCK = 1000


def power_spectrum_blocks(audio: np.ndarray) -> Iterator[np.ndarray]:
    """|STFT|^2 with centred, reflect-padded frames, (frames, bins) in blocks of up to
    FRAMES_PER_BLOCK frames; the last frame dropped."""
    half = N_FFT // 2
    if audio.shape[0] <= half:
        # Reflection needs more samples than the half window; too short to hold speech.
        audio = np.pad(audio, (0, half + 1 - audio.shape[0]))
    padded = np.pad(audio, (half, half), mode="reflect")
    n_frames = 1 + (padded.shape[0] - N_FFT) // HOP_LENGTH
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][: n_frames - 1]
    for start in range(0, n_frames - 1, FRAMES_PER_BLOCK):
        spectrum = np.fft.rfft(frames[start : start + FRAMES_PER_BLOCK] * _hann_window(), axis=-1)
        yield (np.abs(spectrum) ** 2).astype(np.float32)


def power_spectrum(audio: np.ndarray) -> np.ndarray:
    """|STFT|^2 with centred, reflect-padded frames; (frames, bins), the last frame dropped."""
    return np.concatenate(list(power_spectrum_blocks(audio)))


def log_mel_frames(audio: np.ndarray, n_mels: int = 80, padding: int = 0) -> np.ndarray:
    """Whisper's normalised log10 mel spectrogram as numpy, (frames, n_mels)."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if padding:
        audio = np.pad(audio, (0, padding))
    filters = mel_filters(n_mels).T
    mel = np.concatenate([block @ filters for block in power_spectrum_blocks(audio)])
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


class Spectrogram(mx.array):
    """An MLX array with PyTorch's `.to(device)`, so that openai-whisper's code, which moves a
    spectrogram to the model's device, runs unchanged.  Every MLX device reads the same memory,
    so there is nothing to move: `to` returns the array itself."""

    def to(self, *args, **kwargs) -> Spectrogram:
        return self


def log_mel_spectrogram(audio, n_mels: int = 80, padding: int = 0, device: object = None) -> Spectrogram:
    """Log-mel of a path or waveform, shaped (n_mels, frames) like openai-whisper's.

    `device` is accepted for openai-whisper's code and unused: MLX arrays need no moving.
    """
    if not isinstance(audio, (np.ndarray, mx.array)):
        audio = load_audio(audio)
    return Spectrogram(log_mel_frames(np.asarray(audio), n_mels, padding).T)


def frames_first(mel: mx.array, n_mels: int) -> mx.array:
    """A log-mel in the engine's (..., frames, n_mels) layout, given either that or openai-whisper's
    (..., n_mels, frames), as `log_mel_spectrogram` returns it.  Anything else (encoded audio
    features) passes unchanged."""
    if mel.ndim >= 2 and mel.shape[-2] == n_mels and mel.shape[-1] != n_mels:
        return mx.swapaxes(mel, -1, -2)
    return mel
