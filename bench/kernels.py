"""Compiled CPU kernels (whisper/kernels) against MLX's own ops: per op and per encoder window.

    .venv/bin/python bench/kernels.py                 # ~3-5 min on 2 loaded cores
    .venv/bin/python bench/kernels.py --runs 9 --models base
    .venv/bin/python bench/kernels.py --decode --baseline /tmp/old/_fast_ops.cpython-311-x86_64-linux-gnu.so
    .venv/bin/python bench/kernels.py --products

Each row times MLX's op ("mlx") and the compiled kernel ("ours") alternately in the same
process, run by run, so load from other processes spreads over both; the table shows medians
and their ratio.  The encoder rows time `model.embed_audio` on one 30 s window of real speech
(jfk.flac padded with silence), the transcribe rows a whole greedy `whisper.transcribe` of
jfk.flac, each with the kernels on and inside `kernels.fallback()`.

`--decode` times a decoding step's parts instead: the matrix-vector products (vocabulary, a
layer's projection, one small enough for L2 to show the arithmetic's rate) and single-query
attention over a window's keys, with the bytes each must read and the rate reached, next to
numpy's float32 sgemv over the vocabulary (OpenBLAS, all cores) as the machine's read rate;
then whole compiled steps (wall and CPU ms per step), each side on its own copy of the model.
With `--baseline LIB` the other side is another build of the kernels (copy
`whisper/kernels/_build/_fast_ops*.so` aside before changing them) instead of MLX's ops, timed
alternately with this build in the same process.  MENNY_KERNEL_THREADS=1: one thread's rate.

`--products` times the encoder's products of one window (1500 rows) at the shapes of small,
medium and large-v3's layers: the float32 product the engine runs (the panel product of float16
weights on AVX-512, else MLX's) against `kernels.quantized_product` of the same weights in 8 bits
(what `load_model(..., quantize=8)` runs), with the rate each reaches (multiply-adds count two).
Prints a markdown table; results and predictions go in bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# whisper.configure() loads OpenBLAS, which must happen before mlx.core is imported.
import whisper  # noqa: E402

whisper.configure()  # OpenBLAS before the engine's modules import mlx.core

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


def alternate(runs: int, first: Callable[[], mx.array], second: Callable[[], mx.array]) -> tuple[float, float]:
    """Median seconds of first() and second(), measured alternately after one warm-up each."""
    timed(first)
    timed(second)
    first_times, second_times = [], []
    for run in range(runs):
        for use_second in (run % 2 == 0, run % 2 == 1):
            if use_second:
                second_times.append(timed(second))
            else:
                first_times.append(timed(first))
    return statistics.median(first_times), statistics.median(second_times)


def compare(runs: int, fn: Callable[[], mx.array]) -> tuple[float, float]:
    """Median seconds of fn() with MLX's ops and with the kernels, measured alternately."""

    def with_mlx_ops() -> mx.array:
        with kernels.fallback():
            return fn()

    return alternate(runs, with_mlx_ops, fn)


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


def load_build(path: Path) -> ModuleType:
    """Another build of the compiled kernels, loaded beside the current one."""
    spec = importlib.util.spec_from_file_location("menny_baseline._fast_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DecodeRow = tuple[str, str, float, float, float]


def repeated(calls: int, fn: Callable[[], mx.array], fallback: bool = False) -> Callable[[], list[mx.array]]:
    """fn() `calls` times in one evaluation (inside `kernels.fallback()` if asked)."""

    def run() -> list[mx.array]:
        with kernels.fallback() if fallback else contextlib.nullcontext():
            return [fn() for _ in range(calls)]

    return run


def decode_rows(runs: int, baseline: ModuleType | None) -> Iterator[DecodeRow]:
    """(op, shape, MB read, other ms, ours ms): MLX's op, or the baseline build's, against ours."""
    ours = kernels.compiled()
    rng = np.random.default_rng(0)
    # (rows, depth, calls per timing): enough calls that MLX's per-evaluation overhead does not dominate.
    for n, depth, calls, what in [
        (51864, 384, 1, "vocabulary, tiny.en"),
        (51864, 512, 1, "vocabulary, base"),
        (1536, 384, 20, "mlp1, tiny.en"),
        (1024, 384, 50, "in L2"),
    ]:
        w = mx.array(rng.standard_normal((n, depth)).astype(np.float16))
        x = mx.array(rng.standard_normal((1, 1, depth)).astype(np.float32))
        mx.eval(w, x)
        if baseline:
            other = repeated(calls, functools.partial(baseline.matvec, x, w))
        else:
            other = repeated(calls, functools.partial(kernels.linear, x, w), fallback=True)
        theirs, mine = alternate(runs, other, repeated(calls, functools.partial(ours.matvec, x, w)))
        shape = f"1 x {depth} @ ({n} x {depth}).T, {what}"
        yield "matvec f16", shape, n * depth * 2 / 1e6, theirs / calls, mine / calls
    for heads in (6, 8):
        calls = 10
        q, k, v = attention_inputs(heads, 1, 1500)
        if baseline:
            other = repeated(calls, functools.partial(baseline.attention, q, k, v, heads, 64**-0.5))
        else:
            other = repeated(calls, functools.partial(kernels.multi_head_attention, q, k, v, heads), fallback=True)
        theirs, mine = alternate(
            runs, other, repeated(calls, functools.partial(ours.attention, q, k, v, heads, 64**-0.5))
        )
        yield "attention", f"{heads} heads, 1 query x 1500 keys", 2 * k.nbytes / 1e6, theirs / calls, mine / calls


def sgemv_rate(runs: int) -> float:
    """GB/s numpy's float32 sgemv reads the tiny.en vocabulary at (OpenBLAS, all cores)."""
    w = np.random.default_rng(1).standard_normal((51864, 384)).astype(np.float32)
    x = np.ones(384, np.float32)
    times = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        w @ x
        times.append(time.perf_counter() - start)
    return w.nbytes / statistics.median(times[1:]) / 1e9


@contextlib.contextmanager
def kernels_of(build: ModuleType | None) -> Iterator[None]:
    """The engine uses `build`'s kernels inside the block (MLX's ops for None)."""
    if build is None:
        with kernels.fallback():
            yield
        return
    original = kernels.compiled
    kernels.compiled = lambda: build
    try:
        yield
    finally:
        kernels.compiled = original


def step_times(runs: int, name: str, other: ModuleType | None, steps: int = 40) -> list[tuple[float, float]]:
    """Median wall and CPU ms of one compiled decoding step (one token, greedy batch 1): with the
    other kernels (MLX's ops or a baseline build), then ours.  Each has its own copy of the
    model, traced with its kernels; runs of `steps` steps alternate between the two."""
    from whisper.decoding import Inference

    speech = load_audio(SPEECH / "jfk.flac")
    mel = whisper.log_mel_spectrogram(np.concatenate([speech, np.zeros(N_SAMPLES - len(speech), np.float32)]))
    tokens = np.concatenate([[50257, 50362], np.random.default_rng(2).integers(0, 50256, steps)])[None]
    sides = []
    for build in (other, kernels.compiled()):
        model = whisper.load_model(name)
        with kernels_of(build):
            features = model.embed_audio(mel.T[None, :3000])
            mx.eval(features)
        sides.append((build, model, features))

    def run(build: ModuleType | None, model: whisper.Whisper, features: mx.array) -> tuple[float, float]:
        with kernels_of(build):
            inference = Inference(model, features)
            mx.eval(inference.device_logits(tokens[:, :2], positions=2))
            wall, cpu = time.perf_counter(), time.process_time()
            for n in range(3, tokens.shape[1] + 1):
                mx.eval(inference.device_logits(tokens[:, :n]))
            return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps

    for side in sides:
        run(*side)
    times: list[list[tuple[float, float]]] = [[], []]
    for index in range(runs):
        for which in (index % 2, 1 - index % 2):
            times[which].append(run(*sides[which]))
    return [
        (statistics.median(w for w, _ in side) * 1e3, statistics.median(c for _, c in side) * 1e3) for side in times
    ]


def product_rows(runs: int) -> Iterator[tuple[int, int, float, float]]:
    """(depth, outputs, float32 seconds, 8-bit seconds) of the encoder's products of one window."""
    rng = np.random.default_rng(3)
    for depth, n in [(768, 3072), (3072, 768), (1024, 1024), (1024, 4096), (4096, 1024), (1280, 5120), (5120, 1280)]:
        x = mx.array(rng.standard_normal((1, 1500, depth)).astype(np.float32))
        w = mx.array((rng.standard_normal((n, depth)) / np.sqrt(depth)).astype(np.float16))
        quantized = mx.quantize(w.astype(mx.float32), group_size=64, bits=8)
        bias = mx.zeros((n,))
        mx.eval(x, w, quantized)
        float_product = kernels.panel_product if kernels.multiplies_in_panels(w) else kernels.linear
        floats = functools.partial(float_product, x, w, bias)
        eight_bits = functools.partial(kernels.quantized_product, x, *quantized, bias)
        yield depth, n, *alternate(runs, floats, eight_bits)


def products_main(runs: int) -> None:
    print("| product | float32 ms | 8-bit ms | speed-up | float32 GFLOP/s | 8-bit GOP/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for depth, n, floats, eight_bits in product_rows(runs):
        operations = 2 * 1500 * depth * n
        print(
            f"| 1500 x {depth} @ ({n} x {depth}).T | {floats * 1e3:.1f} | {eight_bits * 1e3:.1f} "
            f"| {floats / eight_bits:.2f}x | {operations / floats / 1e9:.0f} | {operations / eight_bits / 1e9:.0f} |",
            flush=True,
        )


def decode_main(runs: int, models: list[str], baseline: Path | None) -> None:
    other = load_build(baseline) if baseline else None
    print(f"numpy float32 sgemv, vocabulary of tiny.en: {sgemv_rate(runs):.1f} GB/s\n")
    label = "baseline" if other else "MLX"
    print(f"| op | shape | MB read | {label} ms | ours ms | speed-up | ours GB/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for op, shape, megabytes, theirs, ours in decode_rows(runs, other):
        row = f"| {op} | {shape} | {megabytes:.1f} | {theirs * 1e3:.3f} | {ours * 1e3:.3f} | {theirs / ours:.2f}x"
        print(f"{row} | {megabytes / 1e3 / ours:.1f} |", flush=True)
    print(f"\n| model | {label} step wall ms | ours | {label} step CPU ms | ours |\n|---|---:|---:|---:|---:|")
    for name in models:
        (wall, cpu), (our_wall, our_cpu) = step_times(runs, name, other)
        print(f"| {name} | {wall:.2f} | {our_wall:.2f} | {cpu:.2f} | {our_cpu:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per path and row (default 7)")
    parser.add_argument("--models", nargs="*", default=["tiny.en", "base"])
    parser.add_argument("--decode", action="store_true", help="time a decoding step's parts instead")
    parser.add_argument("--baseline", type=Path, help="with --decode: another build of the kernels to compare")
    parser.add_argument("--products", action="store_true", help="time the encoder's products, float32 and 8-bit")
    args = parser.parse_args()
    mx.set_default_device(mx.cpu)
    module = kernels.compiled()
    if module is None:
        sys.exit("compiled kernels unavailable: run python -m whisper.kernels.build (or unset MENNY_NO_KERNELS)")
    print(
        f"mlx {mx.__version__}, AVX2+FMA kernels: {module.uses_avx2()}, threads: {module.threads()}, "
        f"load average at start: {os.getloadavg()[0]:.1f}, median of {args.runs} runs\n"
    )
    if args.decode:
        decode_main(args.runs, args.models, args.baseline)
        print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
        return
    if args.products:
        products_main(args.runs)
        print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
        return
    print("| op | shape | MLX ms | ours ms | speed-up |")
    print("|---|---|---:|---:|---:|")
    for op, shape, theirs, ours in itertools.chain(op_rows(args.runs), model_rows(args.runs, args.models)):
        print(f"| {op} | {shape} | {theirs * 1e3:.2f} | {ours * 1e3:.2f} | {theirs / ours:.2f}x |", flush=True)
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
