"""A real virtual microphone and a real microphone-server process, for tests.

``VirtualMic`` runs its own PulseAudio daemon (own HOME and XDG_RUNTIME_DIR in a temporary
folder, stopped by PID) with a null sink: whatever is played into the sink, the recorder hears
from the sink's monitor, through PortAudio's ALSA ``pulse``/``default`` devices like a real
microphone. ``ServerProcess`` runs ``python audio_server.py`` on a free port in 18765-18799.
The fixtures in conftest.py hand these out; helpers here compare recorded with played audio.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Mapping
from pathlib import Path

import httpx
import numpy as np
from speech import REPO

SINK = "vsink"
PORTS = range(18765, 18800)
SERVER_START_TIMEOUT_S = 60.0  # a failure guard for a loaded machine, not a speed requirement


def wait_for(condition, what: str, timeout_s: float = 60.0, interval_s: float = 0.05):
    """Polls ``condition`` until it returns something truthy and returns that; raises after
    timeout_s, a guard against hanging on a loaded machine, not a speed requirement."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout_s:.0f} s")
        time.sleep(interval_s)


def _stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 20.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class VirtualMic:
    """A PulseAudio null sink whose monitor is the microphone. Use as a context manager."""

    def __init__(self, root: Path) -> None:
        for tool in ("pulseaudio", "pactl", "paplay", "parec"):
            if shutil.which(tool) is None:
                raise RuntimeError(
                    f"{tool} is missing: install the Debian packages pulseaudio and "
                    "libasound2-plugins (scripts/test does)"
                )
        self.root = root
        self.home = root / "home"
        self.runtime_dir = root / "rt"
        self.socket = self.runtime_dir / "native"
        client_conf = root / "client.conf"
        self._daemon: subprocess.Popen | None = None
        self._keeper: subprocess.Popen | None = None
        self.home.mkdir(parents=True)
        self.runtime_dir.mkdir(mode=0o700)
        # A client that cannot reach this daemon must fail, not start a daemon of its own.
        client_conf.write_text("autospawn = no\n")
        # What a process needs to hear this microphone; HOME stays the caller's.
        self.client_env = {
            "PULSE_SERVER": f"unix:{self.socket}",
            "PULSE_SOURCE": f"{SINK}.monitor",
            "PULSE_SINK": SINK,
            "PULSE_CLIENTCONFIG": str(client_conf),
        }

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) plus what reaches this microphone."""
        return {**(os.environ if base is None else base), **self.client_env}

    def __enter__(self) -> VirtualMic:
        daemon_env = {
            **os.environ,
            "HOME": str(self.home),
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
        }
        self._log = open(self.root / "pulseaudio.log", "wb")
        self._daemon = subprocess.Popen(
            [
                "pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--disallow-exit",
                "--use-pid-file=no", "--log-target=stderr",
                "-L", f"module-native-protocol-unix auth-anonymous=1 socket={self.socket}",
                "-L", f"module-null-sink sink_name={SINK} rate=16000 channels=1",
                "-L", "module-always-sink",
            ],
            env=daemon_env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        try:
            wait_for(self._answers, "the PulseAudio daemon", 30.0, 0.1)
            # With nobody listening, the null sink renders in 2-second blocks, so a new
            # recording would hear nothing for up to 2 s (and lose what is played meanwhile); a
            # steady low-latency listener keeps it delivering audio continuously, like a real
            # microphone. Ready once the listener hears something: the sink has switched.
            self._keeper = subprocess.Popen(
                ["parec", "-d", f"{SINK}.monitor", "--latency-msec=10", "--rate=16000",
                 "--channels=1", "--format=s16le"],
                env=self.env(), stdout=subprocess.PIPE, stderr=self._log,
            )
            hearing = threading.Event()
            threading.Thread(target=self._discard, args=(self._keeper, hearing), daemon=True).start()
            if not hearing.wait(30.0):
                raise RuntimeError("the virtual microphone delivered no audio within 30 s")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        for proc in (self._keeper, self._daemon):
            if proc is not None:
                _stop_process(proc)
        self._log.close()

    @staticmethod
    def _discard(keeper: subprocess.Popen, hearing: threading.Event) -> None:
        assert keeper.stdout is not None
        while keeper.stdout.read1(65536):
            hearing.set()

    def _answers(self) -> bool:
        if self._daemon is not None and self._daemon.poll() is not None:
            log = (self.root / "pulseaudio.log").read_text(errors="replace")
            raise RuntimeError(f"pulseaudio exited with {self._daemon.returncode}:\n{log}")
        return subprocess.run(["pactl", "info"], env=self.env(), capture_output=True).returncode == 0

    @property
    def pid(self) -> int:
        assert self._daemon is not None
        return self._daemon.pid

    def play(self, path: Path) -> None:
        """Plays a WAV into the microphone; returns when PulseAudio has played all of it."""
        subprocess.run(["paplay", "-d", SINK, str(path)], env=self.env(), check=True, timeout=120)

    def recording_pids(self) -> list[int]:
        """The process id of each stream recording from PulseAudio now (the keeper excluded)."""
        out = subprocess.run(
            ["pactl", "list", "source-outputs"], env=self.env(), capture_output=True, text=True,
            check=True,
        ).stdout
        keeper = self._keeper.pid if self._keeper else -1
        pids = []
        for line in out.splitlines():
            key, _, value = line.strip().partition(" = ")
            if key == "application.process.id":
                pid = int(value.strip('"'))
                if pid != keeper:
                    pids.append(pid)
        return pids


def free_port(ports: range = PORTS) -> int:
    """A port in `ports` (default 18765-18799) that nothing listens on now."""
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


class ServerProcess:
    """``python audio_server.py`` as a child process; stop() sends SIGTERM like Ctrl-C would."""

    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        env: Mapping[str, str],
        args: tuple[str, ...] = (),
        host: str = "127.0.0.1",
        token: str | None = None,
        launcher: tuple[str, ...] = (),
    ) -> None:
        """`launcher` is a command that runs the server's command line (its arguments appended)."""
        self.data_dir = data_dir
        self.log_path = log_path
        self.host = host
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=60.0)
        command = [*launcher, sys.executable, str(REPO / "audio_server.py"), "--host", host,
                   "--port", str(self.port), "--data-dir", str(data_dir), *args]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command, cwd=REPO, env=dict(env), stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_healthy(self) -> ServerProcess:
        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"audio_server.py exited with {self.proc.returncode}:\n{self.log()}")
            # Only once this process has the port: another test session may hold it meanwhile.
            if f"Uvicorn running on http://{self.host}:{self.port}" not in self.log():
                return False
            with contextlib.suppress(httpx.TransportError):
                return self.client.get("/health").status_code == 200
            return False

        wait_for(healthy, f"audio_server.py on port {self.port}", SERVER_START_TIMEOUT_S, 0.1)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.client.close()
        return _stop_process(self.proc, sig)

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")


# --- comparing what was recorded with what was played ---------------------------------------


def read_wav(path_or_bytes: Path | bytes) -> tuple[np.ndarray, int]:
    """(int16 samples, rate) of a mono 16-bit WAV file or WAV bytes."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    with wave.open(source) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2), "expected mono 16-bit"
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").copy(), w.getframerate()


def locate(recorded: np.ndarray, played: np.ndarray) -> tuple[int, float, int]:
    """Finds ``played`` inside ``recorded``: (offset, correlation over the played part,
    samples that differ from what was played). Needs the whole played part in the recording."""
    rec = recorded.astype(np.float64)
    ref = played.astype(np.float64)
    n = 1 << int(np.ceil(np.log2(len(rec) + len(ref))))
    xcorr = np.fft.irfft(np.fft.rfft(rec, n) * np.conj(np.fft.rfft(ref, n)), n)
    offset = int(np.argmax(xcorr[: len(rec) - len(ref) + 1]))
    part = rec[offset : offset + len(ref)]
    correlation = float(np.dot(part, ref) / (np.linalg.norm(part) * np.linalg.norm(ref) + 1e-12))
    mismatched = int(np.count_nonzero(part != ref))
    return offset, correlation, mismatched
