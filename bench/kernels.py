"""Compiled CPU kernels (whisper/kernels) against MLX's own ops: per op and per encoder window.

    .venv/bin/python bench/kernels.py                 # ~3-5 min on 2 loaded cores
    .venv/bin/python bench/kernels.py --runs 9 --models base

Each row times MLX's op ("mlx") and the compiled kernel ("ours") alternately in the same
process, run by run, so load from other processes spreads over both; the table shows medians
and their ratio.  The encoder rows time `model.embed_audio` on one 30 s window of real speech
(jfk.flac padded with silence), the transcribe rows a whole greedy `whisper.transcribe` of
jfk.flac, each with the kernels on and inside `kernels.fallback()`.
Prints a markdown table; results and predictions go in bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# whisper first: whisper.backend loads OpenBLAS, which must happen before mlx.core is imported.
import whisper  # noqa: E402

# isort: split
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from whisper import kernels  # noqa: E402
from whisper.audio import N_SAMPLES, load_audio  # noqa: E402

SPEECH = REPO.parent / "shared" / "data" / "speech"


def timed(fn: Callable[[], mx.array]) -> float:
    start = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - start


def compare(runs: int, fn: Callable[[], mx.array]) -> tuple[float, float]:
    """Median seconds of fn() with MLX's ops and with the kernels, measured alternately."""
    with kernels.fallback():
        timed(fn)
    timed(fn)
    mlx_times, our_times = [], []
    for run in range(runs):
        for ours in (run % 2 == 0, run % 2 == 1):
            if ours:
                our_times.append(timed(fn))
            else:
                with kernels.fallback():
                    mlx_times.append(timed(fn))
    return statistics.median(mlx_times), statistics.median(our_times)


def attention_inputs(heads: int, n_q: int, n_k: int) -> tuple[mx.array, mx.array, mx.array]:
    q, k, v = (mx.random.normal((1, n, heads * 64)) for n in (n_q, n_k, n_k))
    mx.eval(q, k, v)
    return q, k, v


Row = tuple[str, str, float, float]


def op_rows(runs: int) -> Iterator[Row]:
    for shape in [(1, 6, 1500, 1500), (1, 8, 1500, 1500), (1, 8, 1, 1500)]:
        x = mx.random.normal(shape) * 4
        mx.eval(x)
        yield "softmax", str(shape), *compare(runs, lambda x=x: kernels.softmax(x))
    for shape in [(1, 1500, 1536), (1, 1500, 2048), (1, 1, 2048)]:
        x = mx.random.normal(shape) * 2
        mx.eval(x)
        yield "gelu", str(shape), *compare(runs, lambda x=x: kernels.gelu(x))
    for heads, n_q, n_k in [(6, 1500, 1500), (8, 1500, 1500), (8, 1, 1500), (8, 100, 1500), (8, 4, 4)]:
        q, k, v = attention_inputs(heads, n_q, n_k)
        attention = lambda q=q, k=k, v=v, heads=heads: kernels.multi_head_attention(q, k, v, heads)  # noqa: E731
        yield "attention", f"{heads} heads, {n_q} queries x {n_k} keys", *compare(runs, attention)


def model_rows(runs: int, models: list[str]) -> Iterator[Row]:
    speech = load_audio(SPEECH / "jfk.flac")
    window = np.concatenate([speech, np.zeros(N_SAMPLES - len(speech), np.float32)])
    for name in models:
        model = whisper.load_model(name)
        mel = whisper.log_mel_spectrogram(window, n_mels=model.dims.n_mels).T[None]
        mx.eval(mel)
        yield "encoder", f"{name}, one 30 s window", *compare(runs, lambda m=model, x=mel: m.embed_audio(x))

        def transcribe(m: whisper.Whisper = model) -> mx.array:
            whisper.transcribe(m, speech, language="en", temperature=0.0)
            return mx.array(0)

        yield "transcribe", f"{name}, jfk.flac (11 s), greedy", *compare(runs, transcribe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per path and row (default 7)")
    parser.add_argument("--models", nargs="*", default=["tiny.en", "base"])
    args = parser.parse_args()
    mx.set_default_device(mx.cpu)
    module = kernels.compiled()
    if module is None:
        sys.exit("compiled kernels unavailable: run python -m whisper.kernels.build (or unset MENNY_NO_KERNELS)")
    print(
        f"mlx {mx.__version__}, AVX2+FMA kernels: {module.uses_avx2()}, threads: {module.threads()}, "
        f"load average at start: {os.getloadavg()[0]:.1f}, median of {args.runs} runs\n"
    )
    print("| op | shape | MLX ms | ours ms | speed-up |")
    print("|---|---|---:|---:|---:|")
    for op, shape, theirs, ours in itertools.chain(op_rows(args.runs), model_rows(args.runs, args.models)):
        print(f"| {op} | {shape} | {theirs * 1e3:.2f} | {ours * 1e3:.2f} | {theirs / ours:.2f}x |", flush=True)
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
