"""The recorder below the HTTP layer, on the virtual microphone: a device that cannot deliver
16 kHz mono is captured at its own rate and channel count, then downmixed and resampled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from speech import clip
from virtual_mic import VirtualMic, locate, read_wav, wait_for

from menny.server.clips import ClipStore
from menny.server.recorder import Recorder, Take, portaudio
from menny.server.wav_file import WavAppender

SPEECH = clip("ls_1272-128104-0000.wav")


def test_48k_stereo_capture_is_converted_to_16k_mono(mic_env: VirtualMic, tmp_path: Path) -> None:
    # devices() re-scans: this process may have listed devices before the microphone existed.
    pulse = next(d for d in Recorder(ClipStore(tmp_path / "clips")).devices() if d.name == "pulse")
    path = tmp_path / "take.wav"
    take = Take(portaudio(), pulse, WavAppender(path), rate=48000, channels=2, max_frames=60 * 16000)
    take.start()
    try:
        # A loaded machine can take a while to open the stream: play only once it delivers.
        wait_for(lambda: take.captured > 4800, "the stream to deliver")
        mic_env.play(SPEECH.path)
        after_play = take.captured
        wait_for(lambda: take.captured > after_play + 24000, "half a second more")
    finally:
        take.stop()
    recorded, rate = read_wav(path)
    assert rate == 16000
    assert abs(len(recorded) - take.captured / 3) <= 64  # resampler delay only
    played, _ = read_wav(SPEECH.path)
    # Through two resamplers (PulseAudio's to 48 kHz, ours back): close, not bit-exact.
    _, correlation, _ = locate(recorded, played)
    assert correlation >= 0.99
    assert take.overflows == 0 and take.error is None
    assert -20 < take.peak_dbfs <= 0
    assert np.count_nonzero(recorded) > len(played) * 0.9
