"""`python -m whisper.corpus IN OUT` in one process, on 20 dev clips with tiny.en: the text of
`transcribe`, failures recorded, a second run that does nothing, a killed run resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from corpus_archive import (
    BROKEN,
    CLIPS,
    OPTIONS,
    clip_name,
    leftovers,
    make_archive,
    transcribe_texts,
    written_texts,
)
from speech import REPO, clip, wer

from whisper.corpus.cli import main


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    root = tmp_path_factory.mktemp("corpus")
    archive = make_archive(root / "in")
    code = main([str(archive), str(root / "out"), *OPTIONS, "-f", "txt", "-f", "srt", "--no-progress"])
    return archive, root / "out", code


def test_every_file_gets_the_text_of_transcribe_and_failures_are_recorded(first_run):
    _, out, code = first_run
    assert code == 1  # two files failed
    expected = transcribe_texts()
    written = written_texts(out)
    assert written == expected
    references = [clip(name.removeprefix("sub/")).transcript for name in expected]
    hypotheses = [written[name] for name in expected]
    assert wer(references, hypotheses) == pytest.approx(wer(references, list(expected.values())))
    record = json.loads((out / "jfk.flac.json").read_text())
    assert record["duration"] == pytest.approx(11.0, abs=0.05) and record["language"] == "en"
    assert (out / "sub" / f"{CLIPS[-1].file}.txt").read_text().split() == expected[clip_name(CLIPS[-1])].split()
    assert "-->" in (out / "jfk.flac.srt").read_text()
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["audio"] for f in failures) == sorted(BROKEN)
    reasons = {f["audio"]: f["reason"] for f in failures}
    assert "empty" in reasons["empty.flac"] and "not a readable audio" in reasons["broken.wav"]
    assert not (out / "notes.txt.json").exists() and not leftovers(out)


def test_a_second_run_does_no_work_and_failures_are_retried_only_when_asked(first_run, capsys):
    archive, out, _ = first_run
    written = {path: path.stat().st_mtime_ns for path in out.rglob("*.json")}
    assert main([str(archive), str(out), *OPTIONS, "--no-progress"]) == 1
    assert "0 files to transcribe, 20 done before, 2 failed before" in capsys.readouterr().err
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*.json")} == written
    assert main([str(archive), str(out), *OPTIONS, "--no-progress", "--retry-failed"]) == 1
    assert "2 files to transcribe, 20 done before" in capsys.readouterr().err
    assert len((out / "failures.jsonl").read_text().splitlines()) == 4


def test_a_killed_run_resumes_where_it_stopped(tmp_path):
    archive = make_archive(tmp_path / "in", CLIPS[:8], broken=False)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "whisper.corpus", str(archive), str(out), *OPTIONS, "--batch-size", "1"]
    run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.rglob("*.json")) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
    done_before = len(list(out.rglob("*.json")))
    assert 1 <= done_before < 8, "the run was to be killed halfway"
    # What a write cut short leaves: a temporary sibling, which must neither count nor stay.
    (out / ".jfk.flac.json.a1b2c3d4").write_text('{"text": "half')
    assert main([str(archive), str(out), *OPTIONS, "--no-progress"]) == 0
    expected = transcribe_texts()
    assert written_texts(out) == {clip_name(c): expected[clip_name(c)] for c in CLIPS[:8]}
    assert not leftovers(out)


def test_ray_is_optional(tmp_path):
    """Without Ray, `import whisper` and the in-process path work, and --ray says how to get it."""
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import whisper, whisper.corpus\n"
        "from whisper.corpus.cli import main\n"
        f"sys.exit(main([{str(tmp_path)!r}, {str(tmp_path / 'out')!r}, '--model', 'tiny.en', '--ray']))\n"
    )
    (tmp_path / "a.wav").write_bytes(b"")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "pip install -r requirements-corpus.txt" in done.stderr
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, whisper, whisper.corpus; print('ray' in sys.modules)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.stdout.strip() == "False"
