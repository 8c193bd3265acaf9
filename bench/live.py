"""Live transcription replayed: how long after a word is spoken it is confirmed.

    .venv/bin/python bench/live.py [AUDIO ...] [--model tiny.en] [--chunk-s 0.5]
                                   [--clock cpu|wall|real] [--long SECONDS] [--busy-cores N]

Without AUDIO it replays each English clip of ../shared/data/speech. Each recording is fed to
`whisper.streaming.StreamingTranscriber` in chunks of `--chunk-s`, as a microphone delivers it,
on one of three clocks:

- `cpu` (default), a simulated clock: audio time advances by the chunk size as chunks arrive,
  and each update adds the CPU seconds this process spent in it (all threads added up), with
  OpenBLAS on one thread meanwhile. That is about what the update takes on a single core of its
  own (more than on two idle cores), and it does not grow when other programs take the cores:
  figures that hold on a busy machine. (OpenBLAS's idle helper threads busy-wait for the next
  product; on a busy machine that spinning doubled the CPU seconds an update counted.)
- `wall`, the same simulated clock adding each update's wall-clock seconds instead: this
  machine as it is now, other programs included.
- `real`: real time; chunks are released as the wall clock reaches them.

When compute falls behind, the chunks that arrived meanwhile go in together at the next update,
as they would from a microphone.  `--busy-cores N` keeps N other processes spinning on the CPU
meanwhile (started before the warm-up, stopped at the end), as the other programs of a laptop do.

Word latency: for each word of the final live transcript, the clock's time when it was confirmed
(it entered `confirmed_words`) minus the time its speech ended in the audio. Where it was spoken
is the end time of the same word in the offline transcript (`whisper.transcribe` with word
timestamps, matched to the live words by difflib over normalised words); a live word with no
offline match uses its own end time from the live pass. Words confirmed by `finish()` count too:
they are confirmed when the recording has ended and the final pass is done.

Prints a line per recording, then the totals: WER of the live and the offline transcripts
against the manifest's reference (where there is one), the median, 90th percentile and maximum
word latency, the median and maximum seconds of an update that decoded. `--long SECONDS`
instead replays one recording of that length made of the clips joined with 2-second pauses.
The last line is `p90_word_latency_s <value>`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import difflib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from busy_cores import busy_cores  # noqa: E402
from speech import english_clips, normalize, wer  # noqa: E402

import whisper  # noqa: E402

OPENBLAS = whisper.configure().openblas  # before the engine's modules import mlx.core
from whisper.audio import SAMPLE_RATE, load_audio  # noqa: E402
from whisper.streaming import LiveWord, StreamingTranscriber  # noqa: E402

CLOCKS = ("cpu", "wall", "real")
PAUSE_S = 2.0


class SimulatedClock:
    """Audio time, pushed on by each update's measured compute time."""

    def __init__(self, measure: Callable[[], float]) -> None:
        self.now = 0.0
        self._measure = measure

    def wait_until(self, seconds: float) -> None:
        self.now = max(self.now, seconds)

    def run(self, work: Callable[[], object]) -> tuple[object, float]:
        started = self._measure()
        result = work()
        spent = self._measure() - started
        self.now += spent
        return result, spent


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """OpenBLAS (where whisper loaded it) computes on one thread meanwhile."""
    if OPENBLAS is None:
        yield
        return
    blas = ctypes.CDLL(OPENBLAS)
    threads = blas.openblas_get_num_threads()
    blas.openblas_set_num_threads(1)
    try:
        yield
    finally:
        blas.openblas_set_num_threads(threads)


class CpuClock(SimulatedClock):
    """The `cpu` clock: this process's CPU seconds, `factor` times over, OpenBLAS on one thread."""

    def __init__(self, factor: float = 1.0) -> None:
        super().__init__(lambda: factor * time.process_time())

    def run(self, work: Callable[[], object]) -> tuple[object, float]:
        with one_blas_thread():
            return super().run(work)


class RealClock:
    def __init__(self) -> None:
        self._start = time.perf_counter()

    @property
    def now(self) -> float:
        return time.perf_counter() - self._start

    def wait_until(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds - self.now))

    def run(self, work: Callable[[], object]) -> tuple[object, float]:
        started = time.perf_counter()
        result = work()
        return result, time.perf_counter() - started


def make_clock(kind: str) -> SimulatedClock | RealClock:
    if kind == "cpu":
        return CpuClock()
    if kind == "wall":
        return SimulatedClock(time.perf_counter)
    return RealClock()


@dataclass
class Replay:
    words: list[LiveWord]  # the final live transcript
    confirmed_at: list[float]  # clock time each word was confirmed
    update_s: list[float] = field(default_factory=list)  # compute time of each update that decoded
    buffer_s: list[float] = field(default_factory=list)  # the transcriber's buffer after each update
    duration_s: float = 0.0

    @property
    def text(self) -> str:
        return "".join(w.word for w in self.words).strip()


def replay(
    model: whisper.Whisper,
    audio: np.ndarray,
    *,
    clock: str | SimulatedClock | RealClock = "cpu",
    chunk_s: float = 0.5,
    after_update: Callable[[StreamingTranscriber], None] | None = None,
    **options,
) -> Replay:
    """Feed `audio` to a StreamingTranscriber chunk by chunk on `clock` (one of CLOCKS, or a clock
    of one's own); see the module docstring."""
    streamer = StreamingTranscriber(model, **options)
    timer = make_clock(clock) if isinstance(clock, str) else clock
    chunk = max(1, round(chunk_s * SAMPLE_RATE))
    n_chunks = -(-audio.size // chunk)
    out = Replay(words=[], confirmed_at=[], duration_s=audio.size / SAMPLE_RATE)

    def record(state) -> None:
        for word in state.confirmed_words[len(out.words) :]:
            out.words.append(word)
            out.confirmed_at.append(timer.now)

    fed = 0  # chunks given to the transcriber
    while fed < n_chunks:
        timer.wait_until(min((fed + 1) * chunk_s, out.duration_s))
        arrived = min(n_chunks, max(fed + 1, int(timer.now / chunk_s + 1e-9)))
        streamer.insert_audio(audio[fed * chunk : arrived * chunk])
        fed = arrived
        passes = streamer.passes
        state, spent = timer.run(streamer.update)
        if streamer.passes > passes:
            out.update_s.append(spent)
        out.buffer_s.append(streamer.buffer_s)
        record(state)
        if after_update is not None:
            after_update(streamer)
    state, _ = timer.run(streamer.finish)
    record(state)
    return out


def spoken_ends(live: list[LiveWord], offline: list[dict]) -> list[float]:
    """When each live word's speech ended: its offline twin's end, else its own."""
    ends = [w.end for w in live]
    matcher = difflib.SequenceMatcher(
        a=[normalize(w.word) for w in live], b=[normalize(w["word"]) for w in offline], autojunk=False
    )
    for block in matcher.get_matching_blocks():
        for i in range(block.size):
            ends[block.a + i] = offline[block.b + i]["end"]
    return ends


def latencies(run: Replay, offline: dict | None = None) -> list[float]:
    """Each live word's confirmation time minus the end of its speech: per the offline transcript's
    word timestamps where it has them, else per the live pass."""
    words = [w for s in offline["segments"] for w in s.get("words", [])] if offline else []
    return [at - end for at, end in zip(run.confirmed_at, spoken_ends(run.words, words))]


def joined(audios: list[np.ndarray], seconds: float, pause_s: float = PAUSE_S) -> np.ndarray:
    """The clips one after another with pauses between, repeated until `seconds` long."""
    pause = np.zeros(round(pause_s * SAMPLE_RATE), dtype=np.float32)
    pieces, total, i = [], 0, 0
    while total < seconds * SAMPLE_RATE:
        for piece in (audios[i % len(audios)], pause):
            pieces.append(piece)
            total += piece.size
        i += 1
    return np.concatenate(pieces)[: round(seconds * SAMPLE_RATE)]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("audio", nargs="*", help="recordings to replay (default: the English dev clips)")
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--chunk-s", type=float, default=0.5, help="audio delivered at a time")
    parser.add_argument("--clock", choices=CLOCKS, default="cpu")
    parser.add_argument("--long", type=float, metavar="SECONDS", help="replay the clips joined, this long")
    parser.add_argument("--busy-cores", type=int, default=0, metavar="N", help="other processes spinning meanwhile")
    args = parser.parse_args()
    with busy_cores(args.busy_cores):
        run_all(args)


def run_all(args: argparse.Namespace) -> None:

    model = whisper.load_model(args.model)
    if args.audio:
        recordings = [(Path(p).name, load_audio(p), None) for p in args.audio]
    else:
        recordings = [(c.file, load_audio(c.path), c.transcript) for c in english_clips()]
    if args.long:
        audio = joined([a for _, a, _ in recordings], args.long)
        recordings = [(f"{len(recordings)} clips joined, {args.long:g} s", audio, None)]
    # Warm-up: the first pass compiles and allocates; no recording should pay for it.
    replay(model, recordings[0][1][: 3 * SAMPLE_RATE], clock="cpu")

    all_latencies, updates, refs, live_texts, offline_texts = [], [], [], [], []
    print(f"model {args.model}, chunks of {args.chunk_s:g} s, clock {args.clock}, {args.busy_cores} busy core(s)")
    for name, audio, reference in recordings:
        offline = whisper.transcribe(model, audio, word_timestamps=True)
        run = replay(model, audio, clock=args.clock, chunk_s=args.chunk_s)
        lat = latencies(run, offline)
        all_latencies += lat
        updates += run.update_s
        line = (
            f"{name}: {run.duration_s:.1f} s, {len(run.words)} words, latency median {percentile(lat, 50):.2f} "
            f"p90 {percentile(lat, 90):.2f} max {max(lat, default=float('nan')):.2f} s, "
            f"update median {percentile(run.update_s, 50):.2f} max {max(run.update_s, default=0):.2f} s"
        )
        if reference is not None:
            refs.append(reference)
            live_texts.append(run.text)
            offline_texts.append(offline["text"])
            line += f", WER live {wer([reference], [run.text]):.1f} offline {wer([reference], [offline['text']]):.1f}"
        print(line, flush=True)
        if reference is None or wer([offline["text"]], [run.text]) > 0:
            print(f"    live:    {run.text}\n    offline: {offline['text'].strip()}")

    if refs:
        print(f"WER live {wer(refs, live_texts):.2f} offline {wer(refs, offline_texts):.2f} ({len(refs)} clips)")
    print(
        f"word latency ({len(all_latencies)} words): median {percentile(all_latencies, 50):.2f} "
        f"p90 {percentile(all_latencies, 90):.2f} max {max(all_latencies):.2f} s; update median "
        f"{statistics.median(updates):.2f} max {max(updates):.2f} s ({len(updates)} updates)"
    )
    print(f"p90_word_latency_s {percentile(all_latencies, 90):.3f}")


if __name__ == "__main__":
    main()
