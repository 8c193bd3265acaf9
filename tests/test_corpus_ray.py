"""`python -m whisper.corpus IN OUT --ray` on real local Ray clusters (2 CPUs, a small object
store, no dashboard, no usage statistics), tiny.en: a cluster started for the run and
stopped after it; a cluster joined by address, whose model holder is killed mid-run.
Every Ray process started here is checked to be gone at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from corpus_archive import BROKEN, CLIPS, OPTIONS, clip_name, leftovers, make_archive, transcribe_texts, written_texts
from speech import REPO

SMALL_CLUSTER = ["--ray-cpus", "2", "--ray-object-store-mb", "100"]
HOLDER = "MapBatches(ModelHolder)"  # in the title Ray gives a model holder's process


def ray_env(temp_dir: str) -> dict[str, str]:
    # A temporary folder per cluster: where Ray keeps its sockets and logs, and the mark by
    # which every process of that cluster is found (its environment names the folder).
    return {**os.environ, "RAY_TMPDIR": temp_dir, "RAY_USAGE_STATS_ENABLED": "0"}


def cluster_processes(temp_dir: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment names `temp_dir`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:  # ended meanwhile, or not ours
            continue
        if f"RAY_TMPDIR={temp_dir}".encode() in environ.split(b"\0"):
            found[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def wait_until_gone(temp_dir: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while (left := cluster_processes(temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"Ray processes left running: {left}"


def short_temp_dir() -> str:
    # Ray's socket paths must stay under 108 characters: pytest's tmp_path is too deep.
    return tempfile.mkdtemp(prefix="menny-ray-", dir="/tmp")


def test_a_local_cluster_is_started_for_the_run_and_stopped_after_it(tmp_path):
    archive = make_archive(tmp_path / "in", CLIPS[:2], broken=False)
    out = tmp_path / "out"
    temp_dir = short_temp_dir()
    command = [sys.executable, "-m", "whisper.corpus", str(archive), str(out), *OPTIONS, "--ray", *SMALL_CLUSTER]
    done = subprocess.run(command, cwd=REPO, env=ray_env(temp_dir), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Started a local Ray instance" in done.stderr
    expected = transcribe_texts()
    assert written_texts(out) == {clip_name(c): expected[clip_name(c)] for c in CLIPS[:2]}
    wait_until_gone(temp_dir)


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, str]]:
    """A local Ray cluster owned by this test process: (its address, its temporary folder)."""
    temp_dir = short_temp_dir()
    saved = {key: os.environ.get(key) for key in ("RAY_TMPDIR", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(RAY_TMPDIR=temp_dir, RAY_USAGE_STATS_ENABLED="0")
    try:
        context = ray.init(num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, log_to_driver=False)
        yield context.address_info["gcs_address"], temp_dir
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    wait_until_gone(temp_dir)


def test_a_joined_cluster_survives_a_model_holder_killed_mid_run(cluster, tmp_path):
    address, temp_dir = cluster
    archive = make_archive(tmp_path / "in")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "whisper.corpus", str(archive), str(out), *OPTIONS, "-f", "txt"]
    command += ["--ray", address, "--batch-size", "2", "--no-progress"]
    run = subprocess.Popen(command, cwd=REPO, env=ray_env(temp_dir), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(out.rglob("*.json")) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        holders = [pid for pid, title in cluster_processes(temp_dir).items() if HOLDER in title]
        done_at_kill = len(list(out.rglob("*.json")))
        assert len(holders) == 1 and 1 <= done_at_kill < len(CLIPS), (holders, done_at_kill)
        os.kill(holders[0], signal.SIGKILL)
        _, stderr = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 1, stderr[-3000:]  # the two unreadable files
    assert written_texts(out) == transcribe_texts()
    assert sorted(json.loads(line)["audio"] for line in (out / "failures.jsonl").read_text().splitlines()) == sorted(
        BROKEN
    )
    assert len(list(out.rglob("*.txt"))) == len(CLIPS) and not leftovers(out)
