"""Find where someone speaks, so long silences and steady noise are never decoded.

Given audio without speech, Whisper tends to write something anyway ("Thank you.").
This detector works on the energy of the speech band (300-3000 Hz) frame by frame: a
frame is speech when it rises clearly above the recording's own noise floor.  Steady
noise (fans, hiss, hum) keeps a flat band energy and so never counts as speech;
changing sounds such as music or a crowd can, and are then left to the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .audio import FRAMES_PER_SECOND, N_FFT, SAMPLE_RATE, power_spectrum


@dataclass(frozen=True)
class VadOptions:
    rise_db: float = 2.0  # above the noise floor, a frame is speech
    floor_percentile: float = 10.0  # quietest share of frames that measures the floor
    min_level_db: float = -60.0  # below this (dBFS in band), never speech
    averaging_s: float = 0.2  # band energy is averaged this long: steady noise then barely moves
    min_speech_s: float = 0.25  # shorter bursts are clicks
    min_silence_s: float = 1.0  # shorter pauses stay inside one region
    pad_s: float = 0.5  # kept around each region so word edges survive


def _band_energy(audio: np.ndarray) -> np.ndarray:
    spectrum = power_spectrum(audio)
    freqs = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    band = (freqs >= 300) & (freqs <= 3000)
    # Normalised so a full-scale sine in the band reads about 0 dB.
    return spectrum[:, band].sum(axis=1) / (N_FFT**2 / 8)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) frame index pairs of the True runs."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def speech_regions(audio: np.ndarray, options: VadOptions = VadOptions()) -> list[tuple[float, float]]:
    """Start and end seconds of each stretch of speech in a 16 kHz waveform."""
    if audio.size < N_FFT:
        return []
    energy = _band_energy(audio)
    width = max(1, round(options.averaging_s * FRAMES_PER_SECOND))
    if energy.size > width:
        energy = np.convolve(np.pad(energy, width // 2, mode="edge"), np.ones(width) / width, mode="valid")[
            : energy.size
        ]
    level = 10 * np.log10(np.maximum(energy, 1e-12))
    floor = np.percentile(level, options.floor_percentile)
    speech = (level > floor + options.rise_db) & (level > options.min_level_db)

    regions: list[list[float]] = []
    for start, end in _runs(speech):
        start_s, end_s = float(start / FRAMES_PER_SECOND), float(end / FRAMES_PER_SECOND)
        if end_s - start_s < options.min_speech_s:
            continue
        if regions and start_s - regions[-1][1] < options.min_silence_s:
            regions[-1][1] = end_s
        else:
            regions.append([start_s, end_s])
    duration = audio.size / SAMPLE_RATE
    padded: list[tuple[float, float]] = []
    for start_s, end_s in regions:
        start_s, end_s = max(0.0, start_s - options.pad_s), min(duration, end_s + options.pad_s)
        if padded and start_s <= padded[-1][1]:
            padded[-1] = (padded[-1][0], end_s)
        else:
            padded.append((start_s, end_s))
    return padded
