"""What quantization costs in accuracy: WER on the English dev clips, float vs 8 and 4 bits.

    .venv/bin/python bench/quantization.py [--models tiny.en base] [--bits 8]

Greedy decoding, language fixed to English, both sides through Whisper's English normaliser.
The unquantized row is float32 on a CPU and float16 on a GPU (the engine's defaults);
bench/gpu_speed.py --quantization runs the same rows on a GPU.  On a CPU 8 bits run the
encoder's products with 8-bit activations (`load_model`'s `quantize`); 4 bits run MLX's quantized
products, which are slow on Linux CPUs (`--bits 8` leaves them out).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speech import english_clips, wer

import whisper

whisper.configure()  # OpenBLAS before the engine's modules import mlx.core

HEADER = "| model | weights | WER % | seconds |\n| --- | --- | --- | --- |"


def quantization_rows(
    name: str,
    source: str,
    audios: list[str | np.ndarray],
    references: list[str],
    bits_rows: tuple[int | None, ...] = (None, 8, 4),
) -> list[str]:
    """Table rows for one model (`source`: a name or folder load_model takes), unquantized (None)
    and quantized to each of `bits_rows`."""
    rows = []
    for bits in bits_rows:
        model = whisper.load_model(source, quantize=bits)
        start = time.perf_counter()
        texts = [whisper.transcribe(model, audio, language="en", temperature=0.0)["text"] for audio in audios]
        seconds = time.perf_counter() - start
        label = str(model.dtype).removeprefix("mlx.core.") if bits is None else f"{bits}-bit"
        rows.append(f"| {name} | {label} | {wer(references, texts):.2f} | {seconds:.0f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    parser.add_argument("--bits", nargs="+", type=int, choices=[8, 4], default=[8, 4], help="the quantized rows")
    args = parser.parse_args()
    clips = english_clips()
    print(HEADER)
    for name in args.models:
        audios, references = [str(c.path) for c in clips], [c.transcript for c in clips]
        quantization_rows(name, name, audios, references, (None, *args.bits))


if __name__ == "__main__":
    main()
