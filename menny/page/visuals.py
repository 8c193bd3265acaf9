"""Pictures of a clip: its waveform envelope and the log-mel spectrogram the model sees.

Figures are built with matplotlib's object API (no pyplot), because Streamlit runs each
session in its own thread and pyplot's global state is not thread-safe.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from menny.wav import wav_samples
from whisper.audio import FRAMES_PER_SECOND, SAMPLE_RATE, log_mel_spectrogram, mel_filters

# Enough columns for a sharp picture at full page width; more only costs time.
MAX_COLUMNS = 1600
# Spectrograms are computed a slice at a time so an hour-long file needs little memory.
SPECTROGRAM_SLICE_S = 300
WAVE_COLOUR = "#4b3fd1"
# Inches: with DPI they set how large the labels look once the picture is fitted to the page.
FIGURE_SIZE = (4.8, 2.3)  # half the page
LIVE_FIGURE_SIZE = (7.2, 1.4)  # a strip across the page
DPI = 200
FREQUENCY_TICKS_HZ = (0, 250, 500, 1000, 2000, 4000, 8000)


def waveform_envelope(audio: np.ndarray, max_columns: int = MAX_COLUMNS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(times in s, minimum, maximum) per column, at most `max_columns` columns.

    A long file becomes a min/max envelope, which looks like the full waveform at screen
    resolution but draws in constant time.
    """
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if audio.size == 0:
        return np.zeros(1), np.zeros(1), np.zeros(1)
    per_column = max(1, int(np.ceil(audio.size / max_columns)))
    n_columns = int(np.ceil(audio.size / per_column))
    padded = np.pad(audio, (0, n_columns * per_column - audio.size), mode="edge")
    columns = padded.reshape(n_columns, per_column)
    times = (np.arange(n_columns) + 0.5) * per_column / SAMPLE_RATE
    return times, columns.min(axis=1), columns.max(axis=1)


def log_mel_db(audio: np.ndarray, n_mels: int = 80, max_columns: int = MAX_COLUMNS) -> np.ndarray:
    """The model's log-mel input in dB, (n_mels, columns), columns averaged down to `max_columns`.

    Whisper's features are log10(power) scaled as (x + 4) / 4, so 10 * log10 is 40 * x - 40.
    """
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    step = SPECTROGRAM_SLICE_S * SAMPLE_RATE
    slices = [
        np.array(log_mel_spectrogram(audio[start : start + step], n_mels=n_mels))
        for start in range(0, max(audio.size, 1), step)
    ]
    features = np.concatenate(slices, axis=1)
    n_frames = features.shape[1]
    if n_frames > max_columns:
        edges = np.linspace(0, n_frames, max_columns + 1).astype(int)
        features = np.add.reduceat(features, edges[:-1], axis=1) / np.diff(edges)
    return 40.0 * features - 40.0


def mel_bin_centres_hz(n_mels: int) -> np.ndarray:
    """Centre frequency of each of Whisper's mel filters (the weighted mean of its triangle)."""
    filters = mel_filters(n_mels)
    fft_hz = np.linspace(0, SAMPLE_RATE / 2, filters.shape[1])
    return (filters @ fft_hz) / filters.sum(axis=1)


def _new_figure(size: tuple[float, float]) -> tuple[Figure, object]:
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    axes.tick_params(labelsize=8)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    return figure, axes


def waveform_figure(audio: np.ndarray, title: str = "Waveform", size: tuple[float, float] = FIGURE_SIZE) -> Figure:
    """Amplitude over time in seconds, as a min/max envelope."""
    times, low, high = waveform_envelope(audio)
    duration = max(np.asarray(audio).size / SAMPLE_RATE, 1e-3)
    figure, axes = _new_figure(size)
    axes.fill_between(times, low, high, color=WAVE_COLOUR, linewidth=0.6, edgecolor=WAVE_COLOUR)
    axes.axhline(0.0, color="#999999", linewidth=0.5)
    peak = max(float(np.max(np.abs(high))), float(np.max(np.abs(low))), 0.05)
    axes.set_ylim(-peak * 1.05, peak * 1.05)
    axes.set_xlim(0, duration)
    axes.set_xlabel("time (s)", fontsize=8)
    axes.set_ylabel("amplitude", fontsize=8)
    axes.set_title(title, fontsize=9, loc="left")
    return figure


def spectrogram_figure(audio: np.ndarray, n_mels: int = 80, title: str = "Log-mel spectrogram") -> Figure:
    """The log-mel input in dB over time (s) and mel frequency (labelled in Hz), with a colour bar."""
    db = log_mel_db(audio, n_mels)
    duration = max(np.asarray(audio).size / SAMPLE_RATE, 1 / FRAMES_PER_SECOND)
    figure, axes = _new_figure(FIGURE_SIZE)
    image = axes.imshow(
        db,
        origin="lower",
        aspect="auto",
        interpolation="nearest",
        cmap="magma",
        extent=(0, duration, -0.5, n_mels - 0.5),
    )
    # Mel bins are evenly spaced in mel, not Hz: place Hz ticks where each frequency falls.
    centres = mel_bin_centres_hz(n_mels)
    ticks = [hz for hz in FREQUENCY_TICKS_HZ if hz <= centres[-1] or hz == FREQUENCY_TICKS_HZ[-1]]
    axes.set_yticks(np.interp(ticks, centres, np.arange(n_mels), left=-0.5, right=n_mels - 0.5))
    axes.set_yticklabels([f"{hz // 1000}k" if hz >= 1000 else str(hz) for hz in ticks])
    axes.set_xlabel("time (s)", fontsize=8)
    axes.set_ylabel("frequency (Hz, mel scale)", fontsize=8)
    axes.set_title(title, fontsize=9, loc="left")
    colour_bar = figure.colorbar(image, ax=axes, pad=0.01)
    colour_bar.set_label("power (dB)", fontsize=8)
    colour_bar.ax.tick_params(labelsize=7)
    return figure


def figure_png(figure: Figure) -> bytes:
    """PNG bytes of a figure, rendered once so reruns of the page only resend the picture."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()


@functools.lru_cache(maxsize=32)
def clip_pictures(audio: Path, n_mels: int) -> tuple[bytes, bytes]:
    """The waveform and the spectrogram of a library transcript's audio file, drawn once: the
    page shows them again on every rerun."""
    samples = wav_samples(audio.read_bytes())
    return figure_png(waveform_figure(samples)), figure_png(spectrogram_figure(samples, n_mels))
