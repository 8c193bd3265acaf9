"""Shared fixtures: a real virtual microphone and real microphone-server processes.

``virtual_mic`` (session)
    A running ``virtual_mic.VirtualMic``: its own PulseAudio daemon with a null sink.
    ``virtual_mic.play(path)`` "speaks" a WAV into the microphone (returns when played);
    ``virtual_mic.env()`` is an environment whose processes record from it;
    ``virtual_mic.recording_pids()`` lists the processes recording from it now.
``mic_env`` (function)
    Points this test process's PulseAudio clients at ``virtual_mic`` (for in-process servers);
    undone after the test.
``no_mic_env`` (session)
    An environment in which PortAudio finds no input device at all.
``audio_server`` (function)
    A factory: ``audio_server(*args, env=None, host="127.0.0.1", token=None, data_dir=None)``
    starts ``python audio_server.py ARGS`` on a free port in 18765-18799 with ``--data-dir``
    (default: a fresh one), hearing ``virtual_mic`` unless ``env`` says otherwise, with
    ``MENNY_TOKEN`` (and the client's header) when ``token`` is given; waits for ``/health``; returns a
    ``virtual_mic.ServerProcess`` (``.url``, ``.client`` an httpx.Client, ``.data_dir``,
    ``.pid``, ``.stop()``). Every server still running is stopped with SIGTERM after the test.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from virtual_mic import ServerProcess, VirtualMic

import whisper

# OpenBLAS must load before any test module imports mlx.core; otherwise MLX multiplies matrices
# with the reference BLAS and engine tests run many times slower.
whisper.configure()


@pytest.fixture(scope="session")
def virtual_mic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VirtualMic]:
    with VirtualMic(tmp_path_factory.mktemp("virtual_mic")) as mic:
        yield mic


@pytest.fixture
def mic_env(virtual_mic: VirtualMic, monkeypatch: pytest.MonkeyPatch) -> VirtualMic:
    for key, value in virtual_mic.client_env.items():
        monkeypatch.setenv(key, value)
    return virtual_mic


@pytest.fixture(scope="session")
def no_mic_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("no_mic")
    (root / "client.conf").write_text("autospawn = no\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PULSE_")}
    # No sound server to reach and none to start; this machine (like CI's) has no sound card.
    env.update(PULSE_SERVER=f"unix:{root}/no-such-socket", PULSE_CLIENTCONFIG=str(root / "client.conf"))
    return env


@pytest.fixture
def audio_server(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []
    counter = itertools.count()

    def start(
        *args: str,
        env: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        token: str | None = None,
        data_dir: Path | None = None,
        launcher: tuple[str, ...] = (),
    ) -> ServerProcess:
        if env is None:
            env = request.getfixturevalue("virtual_mic").env()
        if token is not None:
            env = {**env, "MENNY_TOKEN": token}
        n = next(counter)
        data_dir = data_dir or tmp_path / f"clips{n}"
        for _attempt in range(3):  # another program may take the chosen port meanwhile
            server = ServerProcess(
                data_dir, tmp_path / f"server{n}.log", env, args, host=host, token=token, launcher=launcher
            )
            started.append(server)
            try:
                return server.wait_until_healthy()
            except RuntimeError:
                if "address already in use" not in server.log():
                    raise
        raise RuntimeError("could not find a free port for audio_server.py")

    yield start
    for server in started:
        server.stop()
