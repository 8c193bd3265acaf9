"""What quantization costs in accuracy: WER on the English dev clips, float vs 8 and 4 bits.

    .venv/bin/python bench/quantization.py [--models tiny.en base]

Greedy decoding, language fixed to English, both sides through Whisper's English normaliser.
The unquantized row is float32 on a CPU and float16 on a GPU (the engine's defaults);
bench/gpu_speed.py --quantization runs the same rows on a GPU.  Quantized matrix products
are slow on Linux CPUs, so this takes a while there.
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


def quantization_rows(name: str, source: str, audios: list[str | np.ndarray], references: list[str]) -> list[str]:
    """Table rows for one model (`source`: a name or folder load_model takes), unquantized, 8 and 4 bits."""
    rows = []
    for bits in (None, 8, 4):
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
    args = parser.parse_args()
    clips = english_clips()
    print(HEADER)
    for name in args.models:
        quantization_rows(name, name, [str(c.path) for c in clips], [c.transcript for c in clips])


if __name__ == "__main__":
    main()
