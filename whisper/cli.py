"""`python -m whisper AUDIO ...`: transcribe files from the command line."""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from .audio import AudioError
from .batch import transcribe_batch
from .checkpoints import ModelFormatError
from .models import DEFAULT_MODEL, ModelNotFoundError, load_model
from .runtime import configure
from .tokenizer import LANGUAGES, TO_LANGUAGE_CODE
from .transcribe import TranscribeOptions, transcribe_with
from .utils import optional_float, optional_int, str2bool
from .writers import FORMATS, SubtitleOptions, write_result


def _limit_threads(threads: int) -> None:
    """openai-whisper's --threads (PyTorch's CPU threads there): here the compiled kernels'
    threads (counted when they first run, after this) and OpenBLAS's."""
    os.environ["MENNY_KERNEL_THREADS"] = str(threads)
    openblas = configure().openblas
    if openblas:
        ctypes.CDLL(openblas).openblas_set_num_threads(threads)


def add_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, *short: str, **kwargs) -> None:
    """An option under our spelling (--output-format) and openai-whisper's (--output_format)."""
    spellings = dict.fromkeys([name, "--" + name[2:].replace("-", "_"), *short])
    parser.add_argument(*spellings, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m whisper",
        description="Transcribe or translate speech in audio and video files, on this machine.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("audio", nargs="+", help="audio or video files to transcribe")
    add_model_arguments(parser, batch_size=1)
    add_option(parser, "--output-dir", "-o", default=".", help="where the outputs are written")
    add_option(parser, "--output-format", "-f", default="all", choices=[*FORMATS, "all"], help="output format")
    add_option(parser, "--verbose", type=str2bool, default=True, help="print each segment as it is decoded")
    add_decoding_arguments(parser)
    add_subtitle_arguments(parser)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser, *, batch_size: int) -> None:
    """The model, where it computes, and how many files it decodes together."""
    add = functools.partial(add_option, parser)
    add(
        "--model",
        default=DEFAULT_MODEL,
        help="a name (tiny.en and base are bundled; tiny ... large-v3, turbo, distil-large-v3, ... come from "
        "Hugging Face once), a model folder, an openai-whisper .pt file, or a Hugging Face repo id",
    )
    add("--model-dir", default=None, help="where converted and downloaded models are kept (default: ~/.cache/menny)")
    add("--quantize", type=int, choices=[8, 4], default=None, help="quantize at load (8 bits on a CPU: the encoder)")
    add("--device", default=None, help="cpu or gpu (cuda and mps mean the GPU); default: the GPU if MLX has one")
    add("--fp16", type=str2bool, default=True, help="float16 on a GPU (CPUs compute in float32); False: float32")
    add("--threads", type=optional_int, default=0, help="CPU threads (compiled kernels, OpenBLAS); 0: every core")
    add("--batch-size", type=int, default=batch_size, help="files decoded together, a 30-s window of each (for GPUs)")


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """transcribe()'s options, with openai-whisper's names and defaults."""
    add = functools.partial(add_option, parser)
    add("--vad-filter", type=str2bool, default=False, help="decode only where speech is detected")
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
    add("--clip-timestamps", default="0", help="start,end,start,end,... seconds to transcribe")
    add("--hallucination-silence-threshold", type=optional_float, default=None, help="skip silences this long")


def add_subtitle_arguments(parser: argparse.ArgumentParser) -> None:
    """How word-timed subtitles are cut (they need --word-timestamps True)."""
    add = functools.partial(add_option, parser)
    add("--highlight-words", type=str2bool, default=False, help="underline each word as it is spoken")
    add("--max-line-width", type=optional_int, default=None, help="subtitle characters per line")
    add("--max-line-count", type=optional_int, default=None, help="subtitle lines per cue")
    add("--max-words-per-line", type=optional_int, default=None, help="subtitle words per line")


def _temperatures(args: argparse.Namespace) -> tuple[float, ...]:
    if args.temperature_increment_on_fallback is None:
        return (args.temperature,)
    return tuple(np.arange(args.temperature, 1.0 + 1e-6, args.temperature_increment_on_fallback))


def argument_error(args: argparse.Namespace) -> str | None:
    """What is wrong with a combination of options, or None."""
    word_options = (args.highlight_words, args.max_line_width, args.max_line_count, args.max_words_per_line)
    if any(word_options) and not args.word_timestamps:
        return "--highlight-words and the --max-* line options need --word-timestamps True"
    if args.max_line_count and not args.max_line_width:
        return "--max-line-count needs --max-line-width"
    if args.batch_size < 1:
        return "--batch-size must be at least 1"
    return None


def subtitle_options(args: argparse.Namespace) -> SubtitleOptions:
    return SubtitleOptions(args.max_line_width, args.max_line_count, args.max_words_per_line, args.highlight_words)


def transcribe_options(args: argparse.Namespace, *, multilingual: bool) -> TranscribeOptions:
    """The transcription options the command line asks for (those named as transcribe's keywords)."""
    language = args.language
    if language and not multilingual and language.lower() not in {"en", "english"}:
        print(f"{args.model} is English-only; use --model base for {language}", file=sys.stderr)
        language = "en"
    own, decoding = TranscribeOptions.names()
    keywords = {name: value for name, value in vars(args).items() if name in own | decoding}
    condition = args.condition_on_previous_text
    keywords.update(
        temperature=_temperatures(args),
        condition_on_previous_text=args.batch_size == 1 if condition is None else condition,
        language=language,
    )
    return TranscribeOptions.from_keywords(**keywords)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (error := argument_error(args)) is not None:
        print(error, file=sys.stderr)
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
    options = transcribe_options(args, multilingual=model.is_multilingual)
    batched = args.batch_size > 1
    failures = 0

    def skip(audio_path: str, error: Exception) -> None:
        nonlocal failures
        print(f"skipped {audio_path}: {error}", file=sys.stderr)
        failures += 1

    def write(audio_path: str, result: dict, printed: bool) -> None:
        if not printed:
            print(result["text"].strip())
        for path in write_result(result, audio_path, args.output_dir, args.output_format, subtitle_options(args)):
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
                options=options,
            )
        except ValueError as error:  # options that cannot go together: nothing was transcribed
            print(f"cannot transcribe: {error}", file=sys.stderr)
            return 2
        return 1 if failures else 0
    for audio_path in args.audio:
        try:
            result = transcribe_with(model, audio_path, options, verbose=args.verbose)
        except (AudioError, ValueError) as error:
            skip(audio_path, error)
            continue
        write(audio_path, result, printed=args.verbose)
    return 1 if failures else 0
