"""Compiled CPU kernels (whisper/kernels) against MLX's own ops: per op and per encoder window.

    .venv/bin/python bench/kernels.py                 # ~3-5 min on 2 loaded cores
    .venv/bin/python bench/kernels.py --runs 9 --models base

Each row times MLX's op ("mlx") and the compiled kernel ("ours") alternately in the same
process, run by run, so load from other processes spreads over both; the table shows medians
and their ratio.  The encoder rows time `model.embed_audio` on one 30 s window of real speech
(jfk.flac padded with silence) with the kernels on and inside `kernels.fallback()`.
Prints a markdown table; results and predictions go in bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mlx.core as mx  # noqa: E402  (whisper.backend must load OpenBLAS first: imported via whisper)
import numpy as np  # noqa: E402

import whisper  # noqa: E402
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


def op_rows(runs: int) -> list[tuple[str, str, float, float]]:
    rows = []
    for shape in [(1, 6, 1500, 1500), (1, 8, 1500, 1500), (1, 8, 1, 1500)]:
        x = mx.random.normal(shape) * 4
        mx.eval(x)
        rows.append(("softmax", str(shape), *compare(runs, lambda x=x: kernels.softmax(x))))
    for shape in [(1, 1500, 1536), (1, 1500, 2048), (1, 1, 2048)]:
        x = mx.random.normal(shape) * 2
        mx.eval(x)
        rows.append(("gelu", str(shape), *compare(runs, lambda x=x: kernels.gelu(x))))
    for heads, n_q, n_k in [(6, 1500, 1500), (8, 1500, 1500), (8, 1, 1500), (8, 100, 1500), (8, 4, 4)]:
        q, k, v = attention_inputs(heads, n_q, n_k)
        attention = lambda q=q, k=k, v=v, heads=heads: kernels.multi_head_attention(q, k, v, heads)  # noqa: E731
        rows.append(("attention", f"{heads} heads, {n_q} queries x {n_k} keys", *compare(runs, attention)))
    return rows


def encoder_rows(runs: int, models: list[str]) -> list[tuple[str, str, float, float]]:
    audio = load_audio(SPEECH / "jfk.flac")
    audio = np.concatenate([audio, np.zeros(N_SAMPLES - len(audio), np.float32)])
    rows = []
    for name in models:
        model = whisper.load_model(name)
        mel = whisper.log_mel_spectrogram(audio, n_mels=model.dims.n_mels).T[None]
        mx.eval(mel)
        rows.append(("encoder", f"{name}, one 30 s window", *compare(runs, lambda m=model, x=mel: m.embed_audio(x))))
    return rows


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
    rows = op_rows(args.runs) + encoder_rows(args.runs, args.models)
    print("| op | shape | MLX ms | ours ms | speed-up |")
    print("|---|---|---:|---:|---:|")
    for op, shape, theirs, ours in rows:
        print(f"| {op} | {shape} | {theirs * 1e3:.2f} | {ours * 1e3:.2f} | {theirs / ours:.2f}x |")
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
