"""Recording the microphone through PortAudio (``sounddevice``) into clips.

``Recorder`` owns the one lock and at most one ``Take`` (a recording in progress). A take is a
PortAudio input stream whose callback only copies each block into a queue; a writer thread
turns the blocks into 16 kHz mono 16-bit samples and appends them to the clip's WAV file as they
arrive (``WavAppender`` keeps the header valid), so a crash loses at most the last second.

Capture is 16 kHz mono float32 straight from PortAudio when the device accepts it (sound servers
such as PulseAudio convert with their own resamplers); otherwise the device's own rate is
captured and converted with FFmpeg's band-limited resampler, and extra channels are averaged.

All PortAudio calls happen under the lock, because re-scanning devices re-initialises PortAudio.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from menny.server.clips import ClipInfo, ClipStore
from menny.server.levels import LEVEL_FLOOR_DBFS, amplitude_to_dbfs, rms_dbfs
from menny.server.wav_file import WavAppender, read_wav_prefix
from menny.wav import SAMPLE_RATE, float_to_pcm16

log = logging.getLogger(__name__)

LEVEL_WINDOW_FRAMES = SAMPLE_RATE // 10  # the input level is the RMS of the last 100 ms
SYNC_INTERVAL_S = 1.0  # how often a take's file is pushed to disk (fdatasync)
STATUS_RESCAN_INTERVAL_S = 2.0  # how often a status poll may look for a newly connected device

_FIX_PORTAUDIO = (
    "install PortAudio (Debian/Ubuntu: `apt-get install libportaudio2`; macOS: "
    "`brew install portaudio`), then restart the server."
)
_FIX_NO_INPUT = (
    "connect a microphone or start the sound server (PulseAudio or PipeWire), then try again; "
    "GET /devices lists the inputs PortAudio sees and --device picks one."
)


class AudioUnavailable(RuntimeError):
    """The machine cannot record now; ``reason`` says why and ``fix`` what to do."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(f"{reason} To fix: {fix}")
        self.reason = reason
        self.fix = fix


class DeviceNotFound(ValueError):
    """The requested input device does not exist (a bad parameter, unlike AudioUnavailable)."""


class AlreadyRecording(RuntimeError):
    pass


class NotRecording(RuntimeError):
    pass


def portaudio() -> ModuleType:
    """The ``sounddevice`` module, or AudioUnavailable saying how to install PortAudio."""
    try:
        import sounddevice
    except OSError as exc:  # sounddevice raises OSError when the PortAudio library is missing
        raise AudioUnavailable(f"PortAudio is not available ({exc}).", _FIX_PORTAUDIO) from exc
    return sounddevice


@dataclass(frozen=True)
class InputDevice:
    index: int
    name: str
    hostapi: str
    max_input_channels: int
    default_samplerate: float
    is_default: bool


def list_input_devices(sd: ModuleType) -> list[InputDevice]:
    default_index = sd.default.device[0]
    hostapis = sd.query_hostapis()
    return [
        InputDevice(
            index=d["index"],
            name=d["name"],
            hostapi=hostapis[d["hostapi"]]["name"],
            max_input_channels=d["max_input_channels"],
            default_samplerate=d["default_samplerate"],
            is_default=d["index"] == default_index,
        )
        for d in sd.query_devices()
        if d["max_input_channels"] > 0
    ]


def find_input_device(sd: ModuleType, device: int | str | None) -> InputDevice:
    """The input device with this index, or whose name is or contains this text (any case);
    PortAudio's default input for None."""
    devices = list_input_devices(sd)
    if not devices:
        raise AudioUnavailable("No audio input device found.", _FIX_NO_INPUT)
    if device is None:
        return next((d for d in devices if d.is_default), devices[0])
    if isinstance(device, int):
        matches = [d for d in devices if d.index == device]
    else:
        wanted = device.casefold()
        matches = [d for d in devices if d.name.casefold() == wanted] or [
            d for d in devices if wanted in d.name.casefold()
        ]
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(f"{d.index}: {d.name}" for d in devices)
    problem = "matches several input devices" if matches else "is not an input device"
    raise DeviceNotFound(f"{device!r} {problem}; the inputs are {names}")


def choose_capture_format(sd: ModuleType, device: InputDevice) -> tuple[int, int]:
    """(rate, channels) to open ``device`` with: 16 kHz mono if it takes it, else its own rate
    and/or two channels, which the take converts."""
    rates = [SAMPLE_RATE, round(device.default_samplerate)]
    channel_counts = [1, min(2, device.max_input_channels)]
    for rate in dict.fromkeys(rates):
        for channels in dict.fromkeys(channel_counts):
            try:
                sd.check_input_settings(
                    device.index, channels=channels, dtype="float32", samplerate=rate
                )
            except (sd.PortAudioError, ValueError):
                continue
            return rate, channels
    raise AudioUnavailable(
        f"The input device {device.name!r} accepts neither 16 kHz nor its own rate "
        f"({device.default_samplerate:g} Hz) in mono or stereo float32.",
        "choose another input device (GET /devices lists them).",
    )


class StreamResampler:
    """Converts consecutive float32 mono blocks from one rate to another with FFmpeg's
    band-limited resampler, carrying the filter state across blocks."""

    def __init__(self, rate_in: int, rate_out: int = SAMPLE_RATE) -> None:
        import av  # the engine's audio decoder; only needed for devices that cannot do 16 kHz

        self._av = av
        self._rate_in = rate_in
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=rate_out)

    def _collect(self, frames: list[Any]) -> np.ndarray:
        if not frames:
            return np.zeros(0, np.float32)
        return np.concatenate([f.to_ndarray()[0] for f in frames]).astype(np.float32, copy=False)

    def process(self, samples: np.ndarray) -> np.ndarray:
        block = np.ascontiguousarray(samples, dtype=np.float32)[None, :]
        frame = self._av.AudioFrame.from_ndarray(block, format="flt", layout="mono")
        frame.sample_rate = self._rate_in
        return self._collect(self._resampler.resample(frame))

    def flush(self) -> np.ndarray:
        """The samples still inside the filter, at the end of the stream."""
        return self._collect(self._resampler.resample(None))


class Take:
    """One recording: PortAudio stream -> queue -> writer thread -> WAV file.

    ``captured`` (device frames received), ``written_frames`` (16 kHz frames in the file),
    ``level_dbfs``, ``overflows``, ``limit_reached`` and ``error`` may be read from any thread.
    """

    def __init__(
        self,
        sd: ModuleType,
        device: InputDevice,
        appender: WavAppender,
        *,
        rate: int,
        channels: int,
        max_frames: int,
    ) -> None:
        self.device = device
        self.rate = rate
        self.channels = channels
        self.captured = 0
        self.overflows = 0
        self.limit_reached = False
        self.level_dbfs = LEVEL_FLOOR_DBFS
        self.error: str | None = None
        self._sd = sd
        self._appender = appender
        self._max_device_frames = math.ceil(max_frames * rate / SAMPLE_RATE)
        self._peak = 0.0
        self._recent = np.zeros(0, np.float32)
        self._resampler = None if rate == SAMPLE_RATE else StreamResampler(rate)
        self._queue: queue.SimpleQueue[np.ndarray | None] = queue.SimpleQueue()
        # A daemon: everything it wrote is already in the file if the process ends without stop().
        self._writer = threading.Thread(target=self._write_loop, name="menny-wav-writer", daemon=True)
        self._stream = sd.InputStream(
            device=device.index, samplerate=rate, channels=channels, dtype="float32",
            callback=self._callback,
        )

    @property
    def written_frames(self) -> int:
        return self._appender.frames

    @property
    def peak_dbfs(self) -> float:
        return amplitude_to_dbfs(self._peak)

    def start(self) -> None:
        self._writer.start()
        try:
            self._stream.start()
        except BaseException:
            self._finish()
            raise

    def stop(self) -> None:
        """Stops capture, writes what is queued and closes the file."""
        self._stream.stop(ignore_errors=True)
        self._finish()

    def _finish(self) -> None:
        self._stream.close(ignore_errors=True)
        self._queue.put(None)  # the stream is closed: nothing can follow this
        self._writer.join()
        self._appender.close()

    def _callback(self, indata: np.ndarray, frames: int, _time: Any, status: Any) -> None:
        # Runs on PortAudio's thread: no I/O, no locks, no waiting; SimpleQueue.put never blocks.
        if status.input_overflow:
            self.overflows += 1
        room = self._max_device_frames - self.captured
        if frames < room:
            self._queue.put(indata.copy())
            self.captured += frames
            return
        self._queue.put(indata[:room].copy())
        self.captured += room
        self.limit_reached = True
        raise self._sd.CallbackStop  # the microphone closes at the limit; the take stays open

    def _write_loop(self) -> None:
        last_sync = time.monotonic()
        while True:
            blocks = [self._queue.get()]
            while blocks[-1] is not None:  # one write per wake-up, however many blocks waited
                try:
                    blocks.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            end = blocks[-1] is None
            audio = [b for b in blocks if b is not None]
            if self.error is None:
                try:
                    if audio:
                        self._write(np.concatenate(audio))
                    if end and self._resampler is not None:
                        self._write_mono(self._resampler.flush())
                    if end or time.monotonic() - last_sync >= SYNC_INTERVAL_S:
                        self._appender.sync()
                        last_sync = time.monotonic()
                except (OSError, ValueError) as exc:
                    # Keep draining the queue so memory stays bounded; status shows the error.
                    self.error = f"writing {self._appender.path} failed: {exc}"
                    log.error("%s", self.error)
            if end:
                return

    def _write(self, block: np.ndarray) -> None:
        mono = block[:, 0] if self.channels == 1 else block.mean(axis=1, dtype=np.float32)
        if self._resampler is not None:
            mono = self._resampler.process(mono)
        self._write_mono(mono)

    def _write_mono(self, mono: np.ndarray) -> None:
        if mono.size == 0:
            return
        self._peak = max(self._peak, float(np.max(np.abs(mono))))
        self._recent = np.concatenate([self._recent, mono])[-LEVEL_WINDOW_FRAMES:]
        self.level_dbfs = rms_dbfs(self._recent)
        self._appender.append(float_to_pcm16(mono))


@dataclass(frozen=True)
class RecorderStatus:
    recording: bool
    clip_id: str | None
    elapsed_s: float
    level_dbfs: float
    device: str | None
    overflows: int
    limit_reached: bool
    error: str | None


@dataclass(frozen=True)
class StartedTake:
    clip_id: str
    device: InputDevice
    capture_rate: int


@dataclass(frozen=True)
class FinishedTake:
    clip: ClipInfo
    device: str
    peak_dbfs: float
    overflows: int
    limit_reached: bool
    error: str | None


class Recorder:
    """The machine's one recorder: start, stop, status and the audio so far, thread-safe.

    ``device`` is the input used when ``start`` names none (None: PortAudio's default input).
    """

    def __init__(
        self, store: ClipStore, *, device: int | str | None = None, max_clip_s: float = 1800.0
    ) -> None:
        if not 0 < max_clip_s <= 24 * 3600:
            raise ValueError("max_clip_s must be more than 0 and at most 24 hours")
        self.store = store
        self.device = device
        self.max_clip_s = max_clip_s
        self._lock = threading.Lock()
        self._take: Take | None = None
        self._clip_id: str | None = None
        self._last_rescan = -math.inf

    # -- device look-up (callers hold the lock) -------------------------------------------

    def _rescan(self, sd: ModuleType) -> None:
        # PortAudio lists devices once, when it initialises: a microphone plugged in (or a sound
        # server started) later is only seen after re-initialising, which sounddevice offers
        # only through these two functions. Safe here: no stream is open when idle.
        self._last_rescan = time.monotonic()
        try:
            sd._terminate()
            sd._initialize()
        except sd.PortAudioError as exc:
            raise AudioUnavailable(f"PortAudio failed to start ({exc}).", _FIX_NO_INPUT) from exc

    def _find(self, sd: ModuleType, device: int | str | None, *, may_rescan: bool) -> InputDevice:
        try:
            return self._find_once(sd, device)
        except (AudioUnavailable, DeviceNotFound):
            if not may_rescan:
                raise
        self._rescan(sd)
        return self._find_once(sd, device)

    def _find_once(self, sd: ModuleType, device: int | str | None) -> InputDevice:
        if device is not None or self.device is None:
            return find_input_device(sd, device)
        try:
            return find_input_device(sd, self.device)
        except DeviceNotFound as exc:  # the server's own setting: not the client's mistake
            raise AudioUnavailable(
                f"The configured input device is not available: {exc}.",
                "connect it, or restart the server with another --device.",
            ) from exc

    # -- public API ----------------------------------------------------------------------

    def devices(self) -> list[InputDevice]:
        """Input devices, re-scanned when no recording is running."""
        with self._lock:
            sd = portaudio()
            if self._take is None:
                self._rescan(sd)
            return list_input_devices(sd)

    def start(self, device: int | str | None = None) -> StartedTake:
        with self._lock:
            if self._take is not None:
                raise AlreadyRecording(self._clip_id)
            sd = portaudio()
            found = self._find(sd, device, may_rescan=True)
            rate, channels = choose_capture_format(sd, found)
            clip_id, path = self.store.reserve()
            appender = None
            try:
                appender = WavAppender(path)
                take = Take(
                    sd, found, appender, rate=rate, channels=channels,
                    max_frames=round(self.max_clip_s * SAMPLE_RATE),
                )
                take.start()
            except BaseException as exc:
                if appender is not None:
                    appender.close()
                path.unlink(missing_ok=True)
                self.store.release(clip_id)
                if isinstance(exc, sd.PortAudioError):
                    raise AudioUnavailable(
                        f"Could not record from {found.name!r}: {exc}.",
                        "check that no other program holds the device exclusively, or choose "
                        "another input device (GET /devices lists them).",
                    ) from exc
                raise
            self._take, self._clip_id = take, clip_id
            log.info("recording %s from %r at %d Hz", clip_id, found.name, rate)
            return StartedTake(clip_id, found, rate)

    def stop(self) -> FinishedTake:
        with self._lock:
            take, clip_id = self._take, self._clip_id
            if take is None or clip_id is None:
                raise NotRecording()
            self._take = self._clip_id = None
            try:
                take.stop()
            finally:
                self.store.release(clip_id)
            self.store.enforce_retention()
            clip = self.store.get(clip_id)
            log.info("saved %s: %.2f s, %d overflow(s)", clip_id, clip.duration_s, take.overflows)
            return FinishedTake(
                clip=clip, device=take.device.name, peak_dbfs=take.peak_dbfs,
                overflows=take.overflows, limit_reached=take.limit_reached, error=take.error,
            )

    def status(self) -> RecorderStatus:
        with self._lock:
            take = self._take
            if take is not None:
                return RecorderStatus(
                    recording=True, clip_id=self._clip_id, elapsed_s=take.captured / take.rate,
                    level_dbfs=take.level_dbfs, device=take.device.name,
                    overflows=take.overflows, limit_reached=take.limit_reached, error=take.error,
                )
            try:
                sd = portaudio()
                may_rescan = time.monotonic() - self._last_rescan >= STATUS_RESCAN_INTERVAL_S
                device: str | None = self._find(sd, None, may_rescan=may_rescan).name
                error = None
            except AudioUnavailable as exc:
                device, error = None, str(exc)
            return RecorderStatus(
                recording=False, clip_id=None, elapsed_s=0.0, level_dbfs=LEVEL_FLOOR_DBFS,
                device=device, overflows=0, limit_reached=False, error=error,
            )

    def partial_wav(self, start_frame: int = 0) -> tuple[str, bytes] | None:
        """(clip id, WAV of the audio so far from sample `start_frame` on) while recording, else None."""
        with self._lock:
            if self._take is None or self._clip_id is None:
                return None
            path = self.store.path_for(self._clip_id)
            return self._clip_id, read_wav_prefix(path, self._take.written_frames, start_frame)

    def close(self) -> FinishedTake | None:
        """Finishes a running recording (for shutdown); None if there was none."""
        try:
            return self.stop()
        except NotRecording:
            return None
