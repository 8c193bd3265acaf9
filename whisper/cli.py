"""`python -m whisper AUDIO ...`: transcribe files from the command line."""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import backend
from .audio import AudioError
from .batch import transcribe_batch
from .convert import ModelFormatError
from .models import DEFAULT_MODEL, ModelNotFoundError, load_model
from .tokenizer import LANGUAGES, TO_LANGUAGE_CODE
from .transcribe import transcribe
from .utils import optional_float, optional_int, str2bool
from .writers import FORMATS, SubtitleOptions, write_result


def _limit_threads(threads: int) -> None:
    """openai-whisper's --threads (PyTorch's CPU threads there): here the compiled kernels'
    threads (counted when they first run, after this) and OpenBLAS's."""
    os.environ["MENNY_KERNEL_THREADS"] = str(threads)
    if backend.OPENBLAS:
        ctypes.CDLL(backend.OPENBLAS).openblas_set_num_threads(threads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m whisper",
        description="Transcribe or translate speech in audio and video files, on this machine.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def add(name: str, *short: str, **kwargs) -> None:
        """An option under our spelling (--output-format) and openai-whisper's (--output_format)."""
        spellings = dict.fromkeys([name, "--" + name[2:].replace("-", "_"), *short])
        parser.add_argument(*spellings, **kwargs)

    parser.add_argument("audio", nargs="+", help="audio or video files to transcribe")
    add("--model", default=DEFAULT_MODEL, help="tiny.en, base, a model folder or a Hugging Face id")
    add("--model-dir", default=None, help="where converted and downloaded models are kept (default: ~/.cache/menny)")
    add("--quantize", type=int, choices=[8, 4], default=None, help="quantize weights at load (GPU, Apple)")
    add("--device", default=None, help="cpu or gpu (cuda and mps mean the GPU); default: the GPU if MLX has one")
    add("--fp16", type=str2bool, default=True, help="float16 on a GPU (CPUs compute in float32); False: float32")
    add("--threads", type=optional_int, default=0, help="CPU threads (compiled kernels, OpenBLAS); 0: every core")
    add("--batch-size", type=int, default=1, help="files decoded together, a 30-s window of each (for GPUs)")
    add("--vad-filter", type=str2bool, default=False, help="decode only where speech is detected")
    add("--output-dir", "-o", default=".", help="where the outputs are written")
    add("--output-format", "-f", default="all", choices=[*FORMATS, "all"], help="output format")
    add("--verbose", type=str2bool, default=True, help="print each segment as it is decoded")
    add("--task", default="transcribe", choices=["transcribe", "translate"], help="translate: into English")
    languages = sorted(LANGUAGES) + sorted(name.title() for name in TO_LANGUAGE_CODE)
    add("--language", default=None, choices=languages, help="spoken language; detected when absent")
    add("--temperature", type=float, default=0.0, help="sampling temperature")
    add("--best-of", type=optional_int, default=5, help="candidates when sampling at temperature > 0")
    add("--beam-size", type=optional_int, default=5, help="beams at temperature 0; None is greedy")
    add("--patience", type=float, default=None, help="beam search patience (1.0 is conventional)")
    add("--length-penalty", type=float, default=None, help="alpha of Google NMT's length penalty")
    add("--suppress-tokens", default="-1", help="comma-separated token ids; -1: non-speech symbols")
    add("--initial-prompt", default=None, help="text that primes the first window (names, spelling)")
    add("--carry-initial-prompt", type=str2bool, default=False, help="prefix the prompt to every window")
    add(
        "--condition-on-previous-text",
        type=str2bool,
        default=None,
        help="prompt each window with the text before it (default: True; False with --batch-size above 1)",
    )
    add("--temperature-increment-on-fallback", type=optional_float, default=0.2, help="fallback temperature step")
    add("--compression-ratio-threshold", type=optional_float, default=2.4, help="above: fall back")
    add("--logprob-threshold", type=optional_float, default=-1.0, help="below: fall back")
    add("--no-speech-threshold", type=optional_float, default=0.6, help="above (and unlikely): silence")
    add("--word-timestamps", type=str2bool, default=False, help="time every word")
    add("--prepend-punctuations", default="\"'“¿([{-", help="marks merged into the next word")
    add("--append-punctuations", default="\"'.。,，!！?？:：”)]}、", help="marks merged into the word before")
    add("--highlight-words", type=str2bool, default=False, help="underline each word as it is spoken")
    add("--max-line-width", type=optional_int, default=None, help="subtitle characters per line")
    add("--max-line-count", type=optional_int, default=None, help="subtitle lines per cue")
    add("--max-words-per-line", type=optional_int, default=None, help="subtitle words per line")
    add("--clip-timestamps", default="0", help="start,end,start,end,... seconds to transcribe")
    add("--hallucination-silence-threshold", type=optional_float, default=None, help="skip silences this long")
    return parser


# Options handed to transcribe() exactly as given on the command line.
_PASSED_THROUGH = (
    "compression_ratio_threshold",
    "logprob_threshold",
    "no_speech_threshold",
    "initial_prompt",
    "carry_initial_prompt",
    "word_timestamps",
    "prepend_punctuations",
    "append_punctuations",
    "clip_timestamps",
    "hallucination_silence_threshold",
    "vad_filter",
    "task",
    "best_of",
    "beam_size",
    "patience",
    "length_penalty",
    "suppress_tokens",
)


def _temperatures(args: argparse.Namespace) -> tuple[float, ...]:
    if args.temperature_increment_on_fallback is None:
        return (args.temperature,)
    return tuple(np.arange(args.temperature, 1.0 + 1e-6, args.temperature_increment_on_fallback))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    word_options = (args.highlight_words, args.max_line_width, args.max_line_count, args.max_words_per_line)
    if any(word_options) and not args.word_timestamps:
        print("--highlight-words and the --max-* line options need --word-timestamps True", file=sys.stderr)
        return 2
    if args.max_line_count and not args.max_line_width:
        print("--max-line-count needs --max-line-width", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("--batch-size must be at least 1", file=sys.stderr)
        return 2
    if args.threads:
        _limit_threads(args.threads)
    try:
        model = load_model(
            args.model,
            args.device,
            args.model_dir,
            dtype=None if args.fp16 else mx.float32,
            quantize=args.quantize,
        )
    except (ModelNotFoundError, ModelFormatError, ValueError) as error:
        print(f"cannot load the model: {error}", file=sys.stderr)
        return 1
    language = args.language
    if language and model.is_multilingual is False and language.lower() not in {"en", "english"}:
        print(f"{args.model} is English-only; use --model base for {language}", file=sys.stderr)
        language = "en"
    subtitle_options = SubtitleOptions(
        args.max_line_width, args.max_line_count, args.max_words_per_line, args.highlight_words
    )
    batched = args.batch_size > 1
    condition = args.condition_on_previous_text
    options = {name: getattr(args, name) for name in _PASSED_THROUGH}
    options.update(
        temperature=_temperatures(args),
        condition_on_previous_text=not batched if condition is None else condition,
        language=language,
    )
    failures = 0

    def skip(audio_path: str, error: Exception) -> None:
        nonlocal failures
        print(f"skipped {audio_path}: {error}", file=sys.stderr)
        failures += 1

    def write(audio_path: str, result: dict, printed: bool) -> None:
        if not printed:
            print(result["text"].strip())
        for path in write_result(result, audio_path, args.output_dir, args.output_format, subtitle_options):
            print(f"wrote {path}", file=sys.stderr)
        if not result["segments"]:
            print(f"{Path(audio_path).name}: no speech found", file=sys.stderr)

    if batched:
        try:
            transcribe_batch(
                model,
                args.audio,
                batch_size=args.batch_size,
                on_result=lambda i, result: write(args.audio[i], result, printed=False),
                on_error=lambda i, error: skip(args.audio[i], error),
                **options,
            )
        except ValueError as error:  # options that cannot go together: nothing was transcribed
            print(f"cannot transcribe: {error}", file=sys.stderr)
            return 2
        return 1 if failures else 0
    for audio_path in args.audio:
        try:
            result = transcribe(model, audio_path, verbose=args.verbose, **options)
        except (AudioError, ValueError) as error:
            skip(audio_path, error)
            continue
        write(audio_path, result, printed=args.verbose)
    return 1 if failures else 0
