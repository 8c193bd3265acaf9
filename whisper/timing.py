"""Word timings from the decoder's cross-attention.

Some cross-attention heads ("alignment heads") look at the audio frame of the word
being written.  Their attention over the window, normalised and smoothed, forms a cost
matrix; dynamic time warping through it gives each token a time.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .audio import HOP_LENGTH, SAMPLE_RATE, TOKENS_PER_SECOND, frames_first
from .model import Whisper
from .tokenizer import Tokenizer

PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
_SENTENCE_ENDS = ".。!！?？"


@dataclass
class WordTiming:
    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """Median over a sliding window of odd `width` along the last axis, edges reflected."""
    if width <= 1 or x.shape[-1] <= width // 2:
        return x
    pad = width // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1), axis=-1)


@functools.cache
def _compiled(function):
    """`function` compiled by numba, imported only now: numba is large, and a process that never
    asks for word timings need not hold it."""
    import numba

    return numba.njit(cache=True)(function)


def _backtrace(trace: np.ndarray) -> np.ndarray:
    i, j = trace.shape[0] - 1, trace.shape[1] - 1
    trace[0, :] = 2
    trace[:, 0] = 1
    path = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        step = trace[i, j]
        if step == 0:
            i -= 1
            j -= 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    return np.array(path)[::-1, :].T


def dtw(cost_matrix: np.ndarray) -> np.ndarray:
    """The cheapest monotonic path through (tokens, frames): rows of token and frame indices."""
    return _compiled(_backtrace)(_compiled(_dtw_trace)(cost_matrix))


dtw_cpu = dtw  # openai-whisper's name (it has a CUDA version too)


def _dtw_trace(cost_matrix: np.ndarray) -> np.ndarray:
    n, m = cost_matrix.shape
    cost = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    trace = -np.ones((n + 1, m + 1), dtype=np.float32)
    cost[0, 0] = 0
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            diagonal, up, left = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
            if diagonal < up and diagonal < left:
                best, step = diagonal, 0
            elif up < diagonal and up < left:
                best, step = up, 1
            else:
                best, step = left, 2
            cost[i, j] = cost_matrix[i - 1, j - 1] + best
            trace[i, j] = step
    return trace


def find_alignment(
    model: Whisper,
    tokenizer: Tokenizer,
    text_tokens: list[int],
    mel: mx.array,
    num_frames: int,
    *,
    medfilt_width: int = 7,
    qk_scale: float = 1.0,
) -> list[WordTiming]:
    """Each word of `text_tokens` with its start and end in seconds within the window.

    `mel` is the window's log-mel, (frames, n_mels) or (n_mels, frames) as `log_mel_spectrogram`
    makes it, or its features if already encoded.
    """
    if not text_tokens:
        return []
    mel = frames_first(mel, model.dims.n_mels)
    tokens = [*tokenizer.sot_sequence, tokenizer.no_timestamps, *text_tokens, tokenizer.eot]
    encoded = mel.shape == (model.dims.n_audio_ctx, model.dims.n_audio_state)
    audio_features = mel[None] if encoded else model.embed_audio(mel[None])
    logits, _, cross_logits = model.decoder(mx.array([tokens]), audio_features)
    n_sot = len(tokenizer.sot_sequence)
    text_logits = np.array(logits[0, n_sot:-1, : tokenizer.eot].astype(mx.float32))
    text_probs = np.exp(text_logits - text_logits.max(-1, keepdims=True))
    text_probs /= text_probs.sum(-1, keepdims=True)
    text_token_probs = text_probs[np.arange(len(text_tokens)), text_tokens]

    heads = mx.stack([cross_logits[layer][0, head] for layer, head in model.alignment_heads])
    weights = np.array(mx.softmax(heads[:, :, : num_frames // 2].astype(mx.float32) * qk_scale, axis=-1))
    weights = (weights - weights.mean(axis=-2, keepdims=True)) / weights.std(axis=-2, keepdims=True)
    weights = median_filter(weights, medfilt_width)
    matrix = weights.mean(axis=0)[n_sot:-1]
    text_indices, time_indices = dtw(np.ascontiguousarray(-matrix, dtype=np.float64))

    words, word_tokens = tokenizer.split_to_word_tokens([*text_tokens, tokenizer.eot])
    if len(word_tokens) <= 1:
        return []
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / TOKENS_PER_SECOND
    starts, ends = jump_times[boundaries[:-1]], jump_times[boundaries[1:]]
    probabilities = [float(np.mean(text_token_probs[i:j])) for i, j in itertools.pairwise(boundaries)]
    return [
        WordTiming(word, pieces, float(start), float(end), probability)
        for word, pieces, start, end, probability in zip(words, word_tokens, starts, ends, probabilities)
    ]


def merge_punctuations(alignment: list[WordTiming], prepended: str, appended: str) -> None:
    """Attach opening marks to the next word and closing marks to the previous one."""
    following = len(alignment) - 1
    for i in range(len(alignment) - 2, -1, -1):
        previous, after = alignment[i], alignment[following]
        if previous.word.startswith(" ") and previous.word.strip() in prepended:
            after.word = previous.word + after.word
            after.tokens = previous.tokens + after.tokens
            previous.word, previous.tokens = "", []
        else:
            following = i
    previous_index = 0
    for j in range(1, len(alignment)):
        previous, after = alignment[previous_index], alignment[j]
        if not previous.word.endswith(" ") and after.word in appended:
            previous.word = previous.word + after.word
            previous.tokens = previous.tokens + after.tokens
            after.word, after.tokens = "", []
        else:
            previous_index = j


def _clamp_long_words(alignment: list[WordTiming], max_duration: float) -> None:
    """A sentence mark that seems to last long is really a pause: shorten it."""
    for i in range(1, len(alignment)):
        if alignment[i].end - alignment[i].start > max_duration:
            if alignment[i].word in _SENTENCE_ENDS:
                alignment[i].end = alignment[i].start + max_duration
            elif alignment[i - 1].word in _SENTENCE_ENDS:
                alignment[i].start = alignment[i].end - max_duration


def _fit_segment_to_words(
    segment: dict, words: list[dict], last_speech: float, median_duration: float, max_duration: float
) -> None:
    """Reconcile a segment's bounds with its words' times, trimming words stretched over pauses."""
    first = words[0]
    after_pause = first["end"] - last_speech > median_duration * 4
    too_long = first["end"] - first["start"] > max_duration or (
        len(words) > 1 and words[1]["end"] - first["start"] > max_duration * 2
    )
    if after_pause and too_long:
        if len(words) > 1 and words[1]["end"] - words[1]["start"] > max_duration:
            boundary = max(words[1]["end"] / 2, words[1]["end"] - max_duration)
            first["end"] = words[1]["start"] = boundary
        first["start"] = max(0, first["end"] - max_duration)
    if segment["start"] < first["end"] and segment["start"] - 0.5 > first["start"]:
        first["start"] = max(0, min(first["end"] - median_duration, segment["start"]))
    else:
        segment["start"] = first["start"]
    last = words[-1]
    if segment["end"] > last["start"] and segment["end"] + 0.5 < last["end"]:
        last["end"] = max(last["start"] + median_duration, segment["end"])
    else:
        segment["end"] = last["end"]


def add_word_timestamps(
    *,
    segments: list[dict],
    model: Whisper,
    tokenizer: Tokenizer,
    mel: mx.array,
    num_frames: int,
    prepend_punctuations: str = PREPEND_PUNCTUATIONS,
    append_punctuations: str = APPEND_PUNCTUATIONS,
    last_speech_timestamp: float = 0.0,
) -> None:
    """Give each segment of one window its `words`: word, start, end, probability."""
    if not segments:
        return
    tokens_per_segment = [[t for t in segment["tokens"] if t < tokenizer.eot] for segment in segments]
    text_tokens = list(itertools.chain.from_iterable(tokens_per_segment))
    alignment = find_alignment(model, tokenizer, text_tokens, mel, num_frames)
    durations = np.array([t.end - t.start for t in alignment])
    durations = durations[durations.nonzero()]
    median_duration = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    max_duration = median_duration * 2
    if len(durations):
        _clamp_long_words(alignment, max_duration)
    merge_punctuations(alignment, prepend_punctuations, append_punctuations)

    time_offset = segments[0]["seek"] * HOP_LENGTH / SAMPLE_RATE
    timings = iter(alignment)
    for segment, segment_tokens in zip(segments, tokens_per_segment):
        words: list[dict] = []
        covered = 0
        while covered < len(segment_tokens) and (timing := next(timings, None)) is not None:
            if timing.word:
                words.append(
                    {
                        "word": timing.word,
                        "start": round(time_offset + timing.start, 2),
                        "end": round(time_offset + timing.end, 2),
                        "probability": timing.probability,
                    }
                )
            covered += len(timing.tokens)
        if words:
            _fit_segment_to_words(segment, words, last_speech_timestamp, median_duration, max_duration)
            last_speech_timestamp = segment["end"]
        segment["words"] = words
