"""Live transcription (whisper/streaming.py): real speech replayed by bench/live.py's harness
through real weights.

The replays run on the harness's simulated clock that counts each update's CPU seconds, with
OpenBLAS on one thread (bench/live.py's `cpu` clock): audio arrives in real time, compute pushes
the clock on. A word's latency is the clock's time at its confirmation minus the end of the word
in the audio, as the offline transcript's word timestamps have it. It counts what this process
computed, not how busy the machine was (the worst word: 3.3 s here at a load average of 9-11,
most of it the passes a word waits for): the 4-second bound is the issue's requirement for
tiny.en, and a transcriber a few times slower fails it
(test_a_slower_transcriber_fails_the_latency_bound).
"""

from __future__ import annotations

import functools
import re
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
from speech import REPO, clip, english_clips, model, wer

import whisper
from whisper.audio import SAMPLE_RATE, load_audio
from whisper.streaming import LiveState, StreamingTranscriber

sys.path.insert(0, str(REPO / "bench"))
import live as harness

MAX_LATENCY_S = 4.0  # tiny.en, from the end of a word's speech to its confirmation
MAX_WER_GAP = 2.0  # points of WER the final live transcript may lose to the offline one
LONG_S = 600.0  # the dev clips once, each followed by the same pause (about 18 s)
# Fewer passes keep the ten-minute replay short; the buffer and the cost of a pass stay bounded
# at any interval.
LONG_INTERVAL_S = 3.0
LONG_MAX_WER = 8.0


@functools.cache
def dev_replays() -> dict[str, tuple[harness.Replay, dict, list[LiveState]]]:
    """Each English dev clip replayed live, its offline transcript, and every live state seen."""
    tiny = model("tiny.en")
    replays = {}
    for dev_clip in english_clips():
        audio = load_audio(dev_clip.path)
        states: list[LiveState] = []
        run = harness.replay(tiny, audio, after_update=lambda streamer, seen=states: seen.append(streamer.state))
        replays[dev_clip.file] = (run, whisper.transcribe(tiny, audio, word_timestamps=True), states)
    return replays


def late_words(run: harness.Replay, offline: dict) -> list[str]:
    """The words of a replay confirmed more than MAX_LATENCY_S after they were spoken."""
    return [
        f"{word.word.strip()!r} {latency:.2f} s"
        for word, latency in zip(run.words, harness.latencies(run, offline))
        if latency > MAX_LATENCY_S
    ]


def test_final_live_transcripts_are_as_accurate_as_offline_ones() -> None:
    clips = english_clips()
    references = [c.transcript for c in clips]
    live_wer = wer(references, [dev_replays()[c.file][0].text for c in clips])
    offline_wer = wer(references, [dev_replays()[c.file][1]["text"] for c in clips])
    print(f"tiny.en WER over {len(clips)} clips: live {live_wer:.2f}, offline {offline_wer:.2f}")
    assert live_wer <= offline_wer + MAX_WER_GAP


def test_every_word_is_confirmed_within_four_seconds_of_being_spoken() -> None:
    late = []
    all_latencies = []
    for name, (run, offline, _) in dev_replays().items():
        assert run.words, f"{name}: no word confirmed"
        all_latencies += harness.latencies(run, offline)
        late += [f"{name}: {word}" for word in late_words(run, offline)]
    print(
        f"tiny.en word latency: median {statistics.median(all_latencies):.2f} s, "
        f"p90 {np.percentile(all_latencies, 90):.2f} s, max {max(all_latencies):.2f} s"
    )
    assert not late, f"confirmed more than {MAX_LATENCY_S} s after being spoken: {late}"


def test_a_slower_transcriber_fails_the_latency_bound() -> None:
    """The bound above can fail: counting each update's CPU time five times over, as for a
    transcriber five times slower, words come late."""
    name = "jfk.flac"
    run, offline, _ = dev_replays()[name]
    assert not late_words(run, offline)
    slow = harness.replay(model("tiny.en"), load_audio(clip(name).path), clock=harness.CpuClock(factor=5))
    assert late_words(slow, offline)


def test_confirmed_words_only_grow_and_come_before_the_tentative_ones() -> None:
    for name, (run, _, states) in dev_replays().items():
        confirmed: tuple = ()
        for state in states:
            assert state.confirmed_words[: len(confirmed)] == confirmed, f"{name}: a confirmed word changed"
            confirmed = state.confirmed_words
            words = [*state.confirmed_words, *state.tentative_words]
            assert all(0 <= w.start <= w.end <= state.audio_s + 0.5 for w in words), name
            assert state.text.startswith(state.confirmed_text), name
        # finish() confirms the rest: the final transcript is the live one, extended.
        assert run.words[: len(confirmed)] == list(confirmed), name


def test_silence_is_skipped_without_decoding() -> None:
    streamer = StreamingTranscriber(model("tiny.en"))
    for _ in range(10):
        streamer.insert_audio(np.zeros(SAMPLE_RATE, dtype=np.float32))
        streamer.update()
    state = streamer.finish()
    assert streamer.passes == 0
    assert state.text == "" and state.audio_s == 10.0
    assert streamer.buffer_s < 1.0  # the silence is not kept either


def test_speech_between_long_silences_is_transcribed_from_a_short_buffer() -> None:
    speech = clip("jfk.flac")
    streamer = StreamingTranscriber(model("tiny.en"))
    silence = np.zeros(20 * SAMPLE_RATE, dtype=np.float32)
    audio = np.concatenate([silence, load_audio(speech.path), silence])
    held = []
    for start in range(0, audio.size, SAMPLE_RATE // 2):
        streamer.insert_audio(audio[start : start + SAMPLE_RATE // 2])
        streamer.update()
        held.append(streamer.buffer_s)
    state = streamer.finish()
    # Nothing is made up in the silence after it either (Whisper likes to add "Thank you.").
    assert wer([speech.transcript], [state.text]) <= 10, state.text
    # The leading silence was dropped; the trailing one is kept only up to the buffer's bound.
    assert max(held[: 2 * (20 + round(speech.duration))]) <= speech.duration + 2
    assert max(held) <= streamer.max_buffer_s + streamer.interval_s
    assert held[-1] < 1.0
    assert state.confirmed_words[0].start >= 19.5  # times count from the start of the recording


def test_multilingual_model_detects_the_language_and_keeps_it() -> None:
    speech = clip("leopard_de.wav")
    streamer = StreamingTranscriber(model("base"))
    audio = load_audio(speech.path)
    for start in range(0, audio.size, SAMPLE_RATE // 2):
        streamer.insert_audio(audio[start : start + SAMPLE_RATE // 2])
        streamer.update()
    final = streamer.finish()
    assert final.language == "de"
    expected = set(re.findall(r"\w+", speech.transcript.lower()))
    heard = set(re.findall(r"\w+", final.text.lower()))
    assert len(expected & heard) >= len(expected) / 2, final.text


def test_bad_settings_are_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="English-only"):
        StreamingTranscriber(model("tiny.en"), task="translate")
    with pytest.raises(ValueError, match="trim_s"):
        StreamingTranscriber(model("tiny.en"), trim_s=20, max_buffer_s=10)


def _rss_mib() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def test_ten_minutes_keep_memory_and_update_time_flat() -> None:
    tiny = model("tiny.en")
    clips = english_clips()
    pause_s = (LONG_S - sum(c.duration for c in clips)) / len(clips)
    audio = harness.joined([load_audio(c.path) for c in clips], LONG_S, pause_s=pause_s)
    rss, held = [], []

    def measure(streamer: StreamingTranscriber) -> None:
        rss.append(_rss_mib())
        held.append(streamer.buffer_s)

    run = harness.replay(tiny, audio, interval_s=LONG_INTERVAL_S, after_update=measure)
    quarter = len(rss) // 4
    first, last = run.update_s[: len(run.update_s) // 4], run.update_s[-len(run.update_s) // 4 :]
    long_wer = wer([" ".join(c.transcript for c in clips)], [run.text])
    print(
        f"{len(run.update_s)} updates; median update {statistics.median(first):.2f} s in the first quarter, "
        f"{statistics.median(last):.2f} s in the last; RSS {rss[quarter]:.0f} -> {rss[-1]:.0f} MiB; "
        f"buffer at most {max(held):.1f} s; WER {long_wer:.2f}"
    )
    # What a pass costs is bounded by the audio it holds.
    assert max(held) <= StreamingTranscriber(tiny).max_buffer_s + LONG_INTERVAL_S + max(run.update_s) + 0.5
    # Ten minutes of audio is 37 MiB as float32: a transcriber that kept it would show.
    assert rss[-1] - max(rss[:quarter]) < 20
    # A loose bound: a pass over a growing buffer or prompt would cost several times more by now.
    assert statistics.median(last) < 2 * statistics.median(first)
    # And the last minutes are transcribed as well as the first.
    assert long_wer <= LONG_MAX_WER, run.text
