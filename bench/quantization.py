"""What quantization costs in accuracy: WER on the English dev clips, float32 vs 8 and 4 bits.

    .venv/bin/python bench/quantization.py [--models tiny.en base]

Greedy decoding, language fixed to English, both sides through Whisper's English normaliser.
Quantized matrix products are slow on Linux CPUs, so this takes a while there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speech import english_clips, wer

import whisper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    args = parser.parse_args()
    clips = english_clips()
    references = [clip.transcript for clip in clips]
    print("| model | weights | WER % | seconds |")
    print("| --- | --- | --- | --- |")
    for name in args.models:
        for bits in (None, 8, 4):
            model = whisper.load_model(name, quantize=bits)
            start = time.perf_counter()
            texts = [whisper.transcribe(model, str(c.path), language="en", temperature=0.0)["text"] for c in clips]
            seconds = time.perf_counter() - start
            label = "float32" if bits is None else f"{bits}-bit"
            print(f"| {name} | {label} | {wer(references, texts):.2f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
