"""The one WAV layout Menny writes and reads: 16 kHz mono 16-bit PCM after a 44-byte header.

Shared by the server (which records clips in it) and the page (which reads them and hands its
own audio to the player in it).
"""

from __future__ import annotations

import struct

import numpy as np

SAMPLE_RATE = 16000
HEADER_BYTES = 44
BYTES_PER_FRAME = 2  # mono, 16-bit

_HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")


def wav_header(n_frames: int, rate: int = SAMPLE_RATE) -> bytes:
    """The 44-byte header of a mono 16-bit PCM WAV holding ``n_frames`` samples."""
    data_bytes = n_frames * BYTES_PER_FRAME
    return _HEADER.pack(
        b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1, 1,
        rate, rate * BYTES_PER_FRAME, BYTES_PER_FRAME, 16, b"data", data_bytes,
    )


def parse_header(header: bytes) -> tuple[int, int] | None:
    """(rate, frames per the header) for a header of the layout ``wav_header`` writes, else None."""
    if len(header) < HEADER_BYTES:
        return None
    riff, _, wave, fmt, fmt_size, codec, channels, rate, _, align, bits, data, data_bytes = (
        _HEADER.unpack(header[:HEADER_BYTES])
    )
    if (riff, wave, fmt, data) != (b"RIFF", b"WAVE", b"fmt ", b"data"):
        return None
    if (fmt_size, codec, channels, align, bits) != (16, 1, 1, BYTES_PER_FRAME, 16):
        return None
    return rate, data_bytes // BYTES_PER_FRAME


def float_to_pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] to little-endian int16, clipped; exact for int16-sourced floats."""
    return np.clip(np.rint(samples * 32768.0), -32768, 32767).astype("<i2")


def wav_samples(wav: bytes) -> np.ndarray:
    """Float samples of a WAV in this layout; read directly, because decoding a long recording
    on every poll of the page would cost seconds."""
    if parse_header(wav) is None:
        raise ValueError("not a 16-bit mono WAV with a 44-byte header")
    return np.frombuffer(wav, "<i2", offset=HEADER_BYTES).astype(np.float32) / 32768.0


def wav_bytes(audio: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """A WAV of float samples in [-1, 1]."""
    return wav_header(audio.size, rate) + float_to_pcm16(audio).tobytes()
