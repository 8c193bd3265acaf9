"""The microphone server as a real process recording a real virtual microphone: what is played
arrives whole, is transcribed like an upload, survives kill -9 and SIGTERM; many start/stop
cycles and concurrent clients leak nothing; no device, no PortAudio, other hosts and tokens."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from speech import REPO, clip, model, wer
from virtual_mic import ServerProcess, VirtualMic, free_port, locate, read_wav, wait_for

from menny.wav import HEADER_BYTES, parse_header

DEV_CLIP = clip("ls_1272-128104-0000.wav")  # LibriSpeech dev-clean
TOKEN = "a-token-of-twenty-characters"
# PulseAudio fades a new stream in over its first few milliseconds; everything after this many
# samples must arrive bit-exact.
FIRST_BLOCK = 400  # 25 ms


def samples_differing_after_first_block(recorded: np.ndarray, played: np.ndarray) -> tuple[float, int]:
    offset, correlation, _ = locate(recorded, played)
    part = recorded[offset : offset + len(played)]
    return correlation, int(np.count_nonzero(part[FIRST_BLOCK:] != played[FIRST_BLOCK:]))


def wait_for_elapsed(server: ServerProcess, seconds: float) -> dict:
    """Polls /status until the recording holds at least ``seconds`` of audio."""
    def enough() -> dict | None:
        status = server.client.get("/status").json()
        return status if status["elapsed_s"] >= seconds else None

    return wait_for(enough, f"{seconds:.1f} s of recorded audio")


def record_played_clip(server: ServerProcess, mic: VirtualMic, path: Path, tail_s: float = 0.5) -> dict:
    """Starts a recording, plays ``path`` into the microphone, records ``tail_s`` more; returns
    the last status (still recording)."""
    assert server.client.post("/start").status_code == 200
    # PulseAudio connects a new recording stream asynchronously: a clip played at once can begin
    # a few samples before the stream hears anything. Play only once audio arrives.
    wait_for_elapsed(server, 0.1)
    mic.play(path)
    after_play = server.client.get("/status").json()["elapsed_s"]
    return wait_for_elapsed(server, after_play + tail_s)


@dataclass
class Recorded:
    wav: bytes
    saved: dict
    samples: np.ndarray
    path: Path


@pytest.fixture(scope="module")
def dev_clip_recording(
    virtual_mic: VirtualMic, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Recorded]:
    """The dev clip played into the microphone and recorded once by a server process."""
    root = tmp_path_factory.mktemp("e2e")
    server = ServerProcess(root / "clips", root / "server.log", virtual_mic.env()).wait_until_healthy()
    try:
        record_played_clip(server, virtual_mic, DEV_CLIP.path)
        saved = server.client.post("/stop").json()
        wav = server.client.get("/wav").content
        assert wav == server.client.get(saved["url"]).content
    finally:
        server.stop()
    path = root / "fetched.wav"
    path.write_bytes(wav)
    samples, rate = read_wav(wav)
    assert rate == 16000
    yield Recorded(wav, saved, samples, path)


def test_recording_holds_exactly_what_was_played(dev_clip_recording: Recorded) -> None:
    played, _ = read_wav(DEV_CLIP.path)
    correlation, lost = samples_differing_after_first_block(dev_clip_recording.samples, played)
    saved = dev_clip_recording.saved
    print(f"\ne2e: correlation {correlation:.6f}, samples differing after the first block {lost}, "
          f"overflows {saved['overflows']}, clip {saved['duration_s']:.2f} s")
    assert correlation >= 0.99
    assert lost == 0
    assert saved["overflows"] == 0
    assert len(dev_clip_recording.wav) == HEADER_BYTES + 2 * len(dev_clip_recording.samples)


def test_recording_transcribes_like_the_uploaded_file(dev_clip_recording: Recorded) -> None:
    import whisper

    tiny = model("tiny.en")
    uploaded = whisper.transcribe(tiny, str(DEV_CLIP.path))["text"]
    recorded = whisper.transcribe(tiny, str(dev_clip_recording.path))["text"]
    reference = DEV_CLIP.transcript
    print(f"\nreference: {reference}\nuploaded:  {uploaded}\nrecorded:  {recorded}")
    assert wer([reference], [recorded]) <= wer([reference], [uploaded]) + 5.0
    assert wer([reference], [recorded]) <= 15.0


def test_kill_9_leaves_a_readable_wav_with_all_but_the_last_second(
    audio_server: Callable[..., ServerProcess], virtual_mic: VirtualMic
) -> None:
    server = audio_server()
    # Played audio ends more than a second before the kill: all of it must be in the file.
    status = record_played_clip(server, virtual_mic, DEV_CLIP.path, tail_s=1.5)
    clip_id = status["clip_id"]
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()

    path = server.data_dir / f"{clip_id}.wav"
    recorded, _ = read_wav(path)  # as the kill left it, before any repair
    assert len(recorded) >= (status["elapsed_s"] - 1.0) * 16000
    played, _ = read_wav(DEV_CLIP.path)
    correlation, lost = samples_differing_after_first_block(recorded, played)
    assert correlation >= 0.99 and lost == 0

    restarted = audio_server(data_dir=server.data_dir)
    listed = restarted.client.get("/clips").json()
    assert [c["id"] for c in listed] == [clip_id]
    assert listed[0]["duration_s"] >= len(recorded) / 16000
    again, _ = read_wav(restarted.client.get(f"/wav/{clip_id}").content)
    np.testing.assert_array_equal(again[: len(recorded)], recorded)


def test_sigterm_finishes_the_recording(
    audio_server: Callable[..., ServerProcess], virtual_mic: VirtualMic
) -> None:
    server = audio_server()
    status = record_played_clip(server, virtual_mic, clip("ps_cards_005.wav").path)
    # uvicorn shuts down gracefully, then re-raises the signal so the parent sees it.
    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    path = server.data_dir / f"{status['clip_id']}.wav"
    with open(path, "rb") as f:
        _, frames = parse_header(f.read(HEADER_BYTES))
    assert path.stat().st_size == HEADER_BYTES + 2 * frames  # finished: header matches the file
    assert frames >= status["elapsed_s"] * 16000
    played, _ = read_wav(clip("ps_cards_005.wav").path)
    assert samples_differing_after_first_block(read_wav(path)[0], played)[1] == 0
    assert "shutdown: saved the running recording" in server.log()


def _resources(server: ServerProcess) -> tuple[int, int, float]:
    return server.threads(), server.open_files(), server.rss_mib()


def test_200_start_stop_cycles_leak_nothing(
    audio_server: Callable[..., ServerProcess], virtual_mic: VirtualMic
) -> None:
    server = audio_server("--max-clips", "5")

    def cycle() -> None:
        assert server.client.post("/start").status_code == 200
        assert server.client.post("/stop").status_code == 200

    for _ in range(10):  # warm-up: imports, thread pools, allocator arenas
        cycle()
    threads, files, rss = _resources(server)
    for _ in range(200):
        cycle()
    threads_after, files_after, rss_after = _resources(server)
    print(f"\n200 cycles: threads {threads} -> {threads_after}, open files {files} -> {files_after}, "
          f"RSS {rss:.1f} -> {rss_after:.1f} MiB")
    assert server.pid not in virtual_mic.recording_pids()
    assert threads_after == threads
    assert files_after == files
    assert rss_after - rss < 16.0
    assert len(list(server.data_dir.glob("*.wav"))) == 5


def test_20_concurrent_clients_cannot_corrupt_state(
    audio_server: Callable[..., ServerProcess], virtual_mic: VirtualMic
) -> None:
    server = audio_server("--max-clips", "5")
    threads, files, _ = _resources(server)
    allowed = {"start": {200, 409}, "stop": {200, 409}, "status": {200}, "partial": {200, 404},
               "clips": {200}}
    barrier = threading.Barrier(20)

    def client(seed: int) -> list[tuple[str, int, dict | None]]:
        rng = random.Random(seed)
        results = []
        with httpx.Client(base_url=server.url, timeout=60.0) as c:
            barrier.wait()
            for _ in range(15):
                op = rng.choice(list(allowed))
                if op in ("start", "stop"):
                    r = c.post(f"/{op}")
                elif op == "partial":
                    r = c.get("/wav", params={"partial": True})
                else:
                    r = c.get(f"/{op}")
                body = r.json() if op in ("start", "stop") and r.status_code == 200 else None
                assert r.status_code in allowed[op], (op, r.status_code, r.text)
                results.append((op, r.status_code, body))
        return results

    with ThreadPoolExecutor(20) as pool:
        results = [r for rs in pool.map(client, range(20)) for r in rs]
    print(f"\n20 clients: {sorted(Counter((op, code) for op, code, _ in results).items())}")
    started = [body["clip_id"] for op, _, body in results if op == "start" and body]
    stopped = [body["id"] for op, _, body in results if op == "stop" and body]
    if server.client.get("/status").json()["recording"]:
        stopped.append(server.client.post("/stop").json()["id"])
    assert started and sorted(started) == sorted(stopped) and len(set(stopped)) == len(stopped)

    kept = sorted(server.data_dir.glob("*.wav"))
    assert [p.stem for p in kept] == sorted(stopped)[-5:]
    for path in kept:
        with open(path, "rb") as f:
            _, frames = parse_header(f.read(HEADER_BYTES))
        assert path.stat().st_size == HEADER_BYTES + 2 * frames
    assert server.pid not in virtual_mic.recording_pids()
    # The server closes the 20 clients' connections as it notices them closed, and the worker
    # threads of the burst retire once idle for 10 s (checked when a request comes).
    wait_for(
        lambda: server.client.get("/health").status_code == 200
        and server.open_files() <= files and server.threads() <= threads,
        "the burst's connections and worker threads to close", 120.0, 0.5,
    )


def test_without_an_input_device_recording_fails_with_the_fix(
    audio_server: Callable[..., ServerProcess], no_mic_env: dict[str, str]
) -> None:
    server = audio_server(env=no_mic_env)
    assert server.client.get("/health").json() == {"status": "ok"}
    status = server.client.get("/status")
    assert status.status_code == 200
    assert status.json()["device"] is None and status.json()["recording"] is False
    assert "No audio input device found" in status.json()["error"]
    start = server.client.post("/start")
    assert start.status_code == 503
    detail = start.json()["detail"]
    assert detail.startswith("No audio input device found.")
    assert "To fix: connect a microphone" in detail
    assert server.client.get("/devices").json() == []
    assert server.client.post("/stop").status_code == 409


def portaudio_library() -> Path:
    listed = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    return Path(next(line.split(" => ")[1] for line in listed.splitlines() if "libportaudio.so" in line)).resolve()


def test_without_portaudio_the_server_runs_and_says_how_to_install_it(
    audio_server: Callable[..., ServerProcess], no_mic_env: dict[str, str]
) -> None:
    # The server runs in its own mount namespace where the real library file reads as empty:
    # PortAudio is missing for it alone.
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --mount is not permitted here, so no library can be hidden")
    hide = ("unshare", "--mount", "sh", "-c", 'mount --bind /dev/null "$0" && exec "$@"', str(portaudio_library()))
    server = audio_server(env=no_mic_env, launcher=hide)
    fix = "To fix: install PortAudio (Debian/Ubuntu: `apt-get install libportaudio2`"
    status = server.client.get("/status").json()
    assert status["error"].startswith("PortAudio is not available") and fix in status["error"]
    for method, path in [("POST", "/start"), ("GET", "/devices")]:
        answer = server.client.request(method, path)
        assert answer.status_code == 503 and fix in answer.json()["detail"], (path, answer.text)
    assert server.client.post("/stop").status_code == 409
    assert server.client.get("/health").json() == {"status": "ok"}


def test_configured_device(audio_server: Callable[..., ServerProcess]) -> None:
    chosen = audio_server("--device", "pulse")
    assert chosen.client.get("/status").json()["device"] == "pulse"
    assert chosen.client.post("/start").json()["device"] == "pulse"
    chosen.client.post("/stop")

    missing = audio_server("--device", "no such microphone")
    status = missing.client.get("/status").json()
    assert status["device"] is None
    assert "The configured input device is not available" in status["error"]
    start = missing.client.post("/start")
    assert start.status_code == 503 and "restart the server with another --device" in start.json()["detail"]
    # A device the client names is still usable.
    assert missing.client.post("/start", json={"device": "default"}).status_code == 200


def test_other_hosts_refuse_to_start_without_a_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MENNY_TOKEN"}
    result = subprocess.run(
        [sys.executable, "audio_server.py", "--host", "0.0.0.0", "--port", str(free_port()),
         "--data-dir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "refusing to start" in result.stderr and "MENNY_TOKEN" in result.stderr


def test_other_hosts_with_a_token_require_it(
    audio_server: Callable[..., ServerProcess], virtual_mic: VirtualMic
) -> None:
    server = audio_server(host="0.0.0.0", token=TOKEN)
    assert httpx.get(f"{server.url}/health").status_code == 200
    for method, path in [("GET", "/status"), ("POST", "/start"), ("GET", "/wav"), ("GET", "/clips")]:
        assert httpx.request(method, f"{server.url}{path}").status_code == 401
        wrong = httpx.request(method, f"{server.url}{path}", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
    assert server.client.get("/status").json()["recording"] is False
    assert server.client.post("/start").status_code == 200
    assert server.client.post("/stop").status_code == 200


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no token: 401", "token: 413"])
def test_a_1_gb_body_is_refused_unread(
    audio_server: Callable[..., ServerProcess], virtual_mic: VirtualMic, token: str | None
) -> None:
    server = audio_server(host="0.0.0.0", token=TOKEN)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    size = 1 << 30
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            f"POST /start HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
        )
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
        sent, block = 0, b"\0" * (1 << 20)
        with contextlib.suppress(OSError):  # the server closes the connection without reading
            while sent < size:
                sock.sendall(block)
                sent += len(block)
    assert status_line == (b"HTTP/1.1 413 Request Entity Too Large" if token else b"HTTP/1.1 401 Unauthorized")
    assert sent < size
    assert _peak_rss_mib(server.pid) < 150
    assert server.client.get("/status").json()["recording"] is False
