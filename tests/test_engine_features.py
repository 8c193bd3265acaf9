"""Beam search, word timings, the voice-activity filter, writers and the command line."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import srt
import webvtt
from speech import REPO, SPEECH_DIR, english_clips, model, wer

import whisper
from whisper.audio import SAMPLE_RATE, load_audio
from whisper.cli import build_parser
from whisper.vad import speech_regions
from whisper.writers import FORMATS, SubtitleOptions, render

REFERENCE = json.loads((REPO / "tests" / "fixtures" / "reference_transcripts.json").read_text())
JFK = str(SPEECH_DIR / "jfk.flac")


@pytest.mark.timeout(2400)  # a beam-5 pass over the dev set
@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_beam_search_matches_the_reference(name):
    reference = REFERENCE["models"][name]["beam"]["clips"]
    mismatched = []
    texts = []
    for clip in english_clips():
        result = whisper.transcribe(model(name), str(clip.path), language="en", temperature=0.0, beam_size=5, best_of=5)
        texts.append(result["text"])
        ours = [s["tokens"] for s in result["segments"]]
        if ours != [s["tokens"] for s in reference[clip.file]["segments"]]:
            mismatched.append(clip.file)
    beam_wer = wer([c.transcript for c in english_clips()], texts)
    print(f"{name}: beam-5 WER {beam_wer:.2f}% (openai-whisper {100 * REFERENCE['models'][name]['beam']['wer']:.2f}%)")
    assert not mismatched, f"beam search tokens differ from openai-whisper's on {mismatched}"


@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_word_timings_match_the_reference(name):
    reference = REFERENCE["models"][name]["word_timestamps"]
    result = whisper.transcribe(model(name), JFK, language="en", temperature=0.0, word_timestamps=True)
    ours = [w for s in result["segments"] for w in s["words"]]
    theirs = [w for s in reference["segments"] for w in s["words"]]
    assert [w["word"] for w in ours] == [w["word"] for w in theirs]
    errors = [abs(a[key] - b[key]) for a, b in zip(ours, theirs) for key in ("start", "end")]
    print(f"{name}: word timing error median {1000 * np.median(errors):.0f} ms, max {1000 * max(errors):.0f} ms")
    assert max(errors) <= 0.1
    starts = [w["start"] for w in ours]
    assert starts == sorted(starts)
    assert all(w["start"] <= w["end"] for w in ours)
    assert all(0 <= w["probability"] <= 1 for w in ours)


def _noise(seconds: float, rms: float, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32)
    return noise * rms / np.sqrt(np.mean(noise**2))


def test_no_text_from_silence_or_noise():
    m = model("tiny.en")
    silence = np.zeros(60 * SAMPLE_RATE, np.float32)
    assert whisper.transcribe(m, silence)["text"] == ""
    assert whisper.transcribe(m, silence, vad_filter=True)["text"] == ""
    noise = _noise(60, 0.1)
    assert speech_regions(noise) == []
    assert whisper.transcribe(m, noise, vad_filter=True) == {"text": "", "segments": [], "language": "en"}


@pytest.mark.parametrize("snr_db", [0, -10])
def test_speech_in_noise_still_transcribes(snr_db):
    speech = load_audio(JFK)
    rms = float(np.sqrt(np.mean(speech**2)))
    mix = _noise(len(speech) / SAMPLE_RATE + 4, rms * 10 ** (-snr_db / 20))
    mix[2 * SAMPLE_RATE : 2 * SAMPLE_RATE + len(speech)] += speech
    mix /= np.abs(mix).max()
    result = whisper.transcribe(model("base"), mix, vad_filter=True, language="en")
    reference = (
        "And so my fellow Americans ask not what your country can do for you ask what you can do for your country."
    )
    error = wer([reference], [result["text"]])
    print(f"jfk in white noise at {snr_db} dB SNR, base, VAD on: WER {error:.1f}%")
    if snr_db == 0:
        assert error < 35
        assert result["segments"][0]["start"] >= 1.0, "speech starts 2 s in"
    else:
        assert result["text"].strip(), "at -10 dB some speech is still found"


def test_vad_keeps_every_dev_clip_speech():
    for clip in english_clips():
        regions = speech_regions(load_audio(clip.path))
        covered = sum(end - start for start, end in regions)
        assert covered >= 0.8 * clip.duration, f"{clip.file}: {regions}"


@pytest.fixture(scope="module")
def timed_result():
    return whisper.transcribe(model("tiny.en"), JFK, word_timestamps=True)


@pytest.mark.parametrize(
    "options",
    [
        SubtitleOptions(),
        SubtitleOptions(max_line_width=20, max_line_count=2),
        SubtitleOptions(max_words_per_line=3),
        SubtitleOptions(highlight_words=True),
    ],
)
def test_subtitles_parse_back(timed_result, options):
    subtitles = list(srt.parse(render(timed_result, "srt", options)))
    assert subtitles and all(s.start <= s.end for s in subtitles)
    assert [s.index for s in subtitles] == list(range(1, len(subtitles) + 1))
    captions = webvtt.read_buffer(io.StringIO(render(timed_result, "vtt", options)))
    assert len(captions) == len(subtitles)
    spoken = " ".join(c.text for c in captions).replace("<u>", "").replace("</u>", "")
    assert "country" in spoken
    if options.max_line_width:
        assert all(len(line) <= 20 for s in subtitles for line in s.content.splitlines() if " " in line)
        assert all(len(s.content.splitlines()) <= 2 for s in subtitles)
    if options.max_words_per_line:
        assert all(len(line.split()) <= 3 for s in subtitles for line in s.content.splitlines())
    if options.highlight_words:
        words = [w for s in timed_result["segments"] for w in s["words"]]
        assert len(subtitles) == len(words)


def test_tsv_json_txt(timed_result):
    rows = render(timed_result, "tsv").splitlines()
    assert rows[0] == "start\tend\ttext" and len(rows) == len(timed_result["segments"]) + 1
    assert json.loads(render(timed_result, "json")) == json.loads(json.dumps(timed_result))
    assert render(timed_result, "txt").split() == timed_result["text"].split()
    with pytest.raises(ValueError, match="unknown output format"):
        render(timed_result, "docx")


def test_help_lists_every_option():
    help_text = build_parser().format_help()
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in help_text
    for option in (
        "--beam-size",
        "--word-timestamps",
        "--highlight-words",
        "--max-line-width",
        "--max-line-count",
        "--max-words-per-line",
        "--output-format",
        "--vad-filter",
        "--quantize",
        "--language",
        "--task",
    ):
        assert option in help_text


def test_command_line_writes_every_format(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not audio")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "whisper",
            JFK,
            str(bad),
            "--model",
            "tiny.en",
            "--output-dir",
            str(tmp_path),
            "--output-format",
            "all",
            "--verbose",
            "False",
            "--beam-size",
            "None",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1, "one of the two files failed"
    assert "ask not what your country can do for you" in out.stdout
    assert "skipped" in out.stderr and "not a readable audio or video file" in out.stderr
    for fmt in FORMATS:
        assert (tmp_path / f"jfk.{fmt}").stat().st_size > 0
    result = json.loads((tmp_path / "jfk.json").read_text())
    assert set(result) == {"text", "segments", "language"}
