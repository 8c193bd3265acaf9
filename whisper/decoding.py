"""Decode one 30-second window: language detection, then tokens under Whisper's rules.

A decode is assembled from small strategies: an `Inference` that runs the model with
its caches, `LogitFilter`s that forbid tokens, a `TokenDecoder` that picks the next
tokens (greedy, sampling, or beam search) and a `SequenceRanker` that chooses among
the finished candidates.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import mlx.core as mx
import numpy as np

from .audio import CHUNK_LENGTH, N_FRAMES, frames_first
from .backends import Backend
from .model import Whisper
from .rules import (
    TimestampState,
    log_softmax,
    log_sum_exp,
    shifted_logits,
    timestamp_ranges,
    timestamps_win,
)
from .tokenizer import Tokenizer, get_tokenizer


@dataclass(frozen=True)
class DecodingOptions:
    task: str = "transcribe"  # or "translate" (to English)
    language: str | None = None  # None: detect it
    temperature: float = 0.0
    sample_len: int | None = None  # most tokens to sample; default half the text context
    best_of: int | None = None  # candidates sampled at temperature > 0
    beam_size: int | None = None  # beams at temperature 0; None is greedy
    patience: float | None = None  # beam search keeps going until beam_size * patience finish
    length_penalty: float | None = None  # None: rank by mean log-probability
    prompt: str | list[int] | None = None  # previous text, to condition on
    prefix: str | list[int] | None = None  # forced start of this window's text
    suppress_tokens: str | list[int] | None = "-1"  # "-1": the non-speech symbols
    suppress_blank: bool = True  # no blank or end-of-text as the first sampled token
    without_timestamps: bool = False
    max_initial_timestamp: float | None = 1.0
    seed: int = 0  # sampling is reproducible
    fp16: bool = True  # openai-whisper's; unused: the model's dtype (load_model's `dtype`) is the precision


@dataclass(frozen=True)
class DecodingResult:
    audio_features: mx.array
    language: str
    language_probs: dict[str, float] | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    avg_logprob: float = np.nan
    no_speech_prob: float = np.nan
    temperature: float = np.nan
    compression_ratio: float = np.nan


def compression_ratio(text: str) -> float:
    """How much zlib shrinks the text: repetitive hallucinations compress very well."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


# ------------------------------------------------------------------ the model


class Inference:
    """The decoder's passes for the rows of one decoding, through the model's backend: `group` rows
    (beams, samples) per window of audio.  The first pass (the initial tokens, alike in a
    window's rows) runs once per window; its cache is then copied to the window's rows."""

    def __init__(self, model: Whisper, audio_features: mx.array, group: int = 1):
        self.backend = model.backend
        self.group = group
        self.n_audio = audio_features.shape[0]
        self.audio = self.backend.audio_memory(audio_features, group)
        self.cache = self.backend.new_cache(self.n_audio)
        self.n_cached = 0

    def rewind(self, n_cached: int) -> None:
        """Keep only the first `n_cached` positions (say, of a guess that was partly accepted)."""
        self.n_cached = n_cached
        self.cache = self.backend.forget(self.cache, n_cached)

    def logits(self, tokens: np.ndarray, positions: int = 1) -> np.ndarray:
        """Logits of the last `positions` positions, (rows, positions, vocab), as float32."""
        return np.array(self.device_logits(tokens, positions).astype(mx.float32))

    def device_logits(self, tokens: np.ndarray, positions: int = 1) -> mx.array:
        """As `logits`, left where the model computes (a GPU's memory), in the model's dtype."""
        first = self.n_cached == 0 and self.group > 1
        if first:  # one row per window: every row of a window starts alike
            tokens = tokens[:: self.group]
        new_tokens = mx.array(tokens[:, self.n_cached :], dtype=mx.int32)
        offset = self.n_cached
        self.n_cached = tokens.shape[1]
        if new_tokens.shape[1] == 1:
            logits, self.cache = self.backend.step(new_tokens, self.audio, self.cache, mx.array([offset], mx.int32))
            logits = logits[:, None]
        else:
            logits, self.cache = self.backend.forward(new_tokens, self.audio, self.cache, offset, positions)
        if first:
            self.reorder([row // self.group for row in range(self.n_audio * self.group)])
            logits = mx.repeat(logits, self.group, axis=0)
        return logits

    def chained_step(self, last: mx.array, then: Callable, *extra: mx.array) -> tuple[mx.array, ...]:
        """A single-token step for the last chosen ids (rows, 1), still on the device (the host
        need not know them before the step is sent), and `then(logits, *extra)` on its logits
        (rows, vocab), in one call: what `then` returns stays on the device."""
        offset = mx.array([self.n_cached], dtype=mx.int32)
        self.n_cached += 1
        result, self.cache = self.backend.step_then(then)(last, self.audio, self.cache, offset, *extra)
        return result

    def reorder(self, sources: list[int]) -> None:
        """Row i of the cache becomes row sources[i] (the rows that surviving beams came from)."""
        if sources != list(range(len(sources))):
            self.cache = self.backend.reorder(self.cache, sources, self.n_cached)


# -------------------------------------------------------------- logit filters


class LogitFilter:
    """Forbids tokens by rules on the tokens so far (known where the decoding loop runs), so the
    logits themselves can stay where the model computed them: rules alike for every row mark a
    vocabulary-wide mask, each row's own rules are a few ranges of token ids, so that only these
    small arrays, not a (batch, vocab) mask, go to a GPU each step."""

    def forbid(self, forbidden: np.ndarray, tokens: np.ndarray) -> None:
        """Mark the tokens this filter forbids in every row in `forbidden` (rows, vocab), in place;
        it may have one row only.  `tokens` are (batch, length)."""

    def ranges(self, tokens: np.ndarray) -> np.ndarray | None:
        """Each row's own forbidden token ids as (batch, n, 2) [start, stop) ranges, or None."""
        return None

    def apply(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        """Set forbidden tokens' logits to -inf, in place."""
        # One row of mask for all rows, and the forbidden ids, not a (batch, vocab) mask: a step
        # forbids a few dozen tokens, and each pass over the vocabulary costs tens of microseconds.
        forbidden = np.zeros((1, logits.shape[-1]), dtype=bool)
        self.forbid(forbidden, tokens)
        logits[:, np.flatnonzero(forbidden)] = -np.inf
        ranges = self.ranges(tokens)
        # Row by row: a few slices, not comparisons over the whole vocabulary (in_ranges).
        for row, pairs in enumerate([] if ranges is None else ranges):
            for start, stop in pairs:
                logits[row, start:stop] = -np.inf


class SuppressBlank(LogitFilter):
    """A window's text must not start with a space or end at once."""

    def __init__(self, tokenizer: Tokenizer, sample_begin: int):
        self.suppressed = [*tokenizer.encode(" "), tokenizer.eot]
        self.sample_begin = sample_begin

    def forbid(self, forbidden: np.ndarray, tokens: np.ndarray) -> None:
        if tokens.shape[1] == self.sample_begin:
            forbidden[:, self.suppressed] = True


class SuppressTokens(LogitFilter):
    def __init__(self, suppressed: list[int]):
        self.suppressed = suppressed

    def forbid(self, forbidden: np.ndarray, tokens: np.ndarray) -> None:
        forbidden[:, self.suppressed] = True


class ApplyTimestampRules(LogitFilter):
    """Timestamps come in pairs, never go back, start the text, and win when likelier."""

    def __init__(self, tokenizer: Tokenizer, sample_begin: int, max_initial_timestamp_index: int | None):
        self.tokenizer = tokenizer
        self.sample_begin = sample_begin
        self.max_initial_timestamp_index = max_initial_timestamp_index

    def forbid(self, forbidden: np.ndarray, tokens: np.ndarray) -> None:
        begin = self.tokenizer.timestamp_begin
        forbidden[:, self.tokenizer.no_timestamps] = True
        if tokens.shape[1] == self.sample_begin:
            forbidden[:, :begin] = True
            if self.max_initial_timestamp_index is not None:
                forbidden[:, begin + self.max_initial_timestamp_index + 1 :] = True

    def state(self, tokens: np.ndarray) -> TimestampState:
        sequences = tokens[:, self.sample_begin :]
        n_rows, length = sequences.shape
        is_timestamp = sequences >= self.tokenizer.timestamp_begin
        seen = is_timestamp.any(axis=1)
        latest = np.zeros(n_rows, dtype=np.int64)
        if length:
            last_index = length - 1 - is_timestamp[:, ::-1].argmax(axis=1)
            latest = np.where(seen, sequences[np.arange(n_rows), last_index], 0)
        return TimestampState(
            last=is_timestamp[:, -1] if length else np.zeros(n_rows, dtype=bool),
            penultimate=is_timestamp[:, -2] if length >= 2 else np.ones(n_rows, dtype=bool),
            latest=latest,
            seen=seen,
        )

    def ranges(self, tokens: np.ndarray) -> np.ndarray:
        return timestamp_ranges(self.state(tokens), self.tokenizer.timestamp_begin, self.tokenizer.eot, np)

    def apply(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        # Called last: the likelier-timestamps rule weighs what every filter left.
        super().apply(logits, tokens)
        begin = self.tokenizer.timestamp_begin
        with np.errstate(divide="ignore", invalid="ignore"):
            logits[timestamps_win(logits, begin, np), :begin] = -np.inf


@functools.cache
def chained_choice(backend: Backend, timestamp_begin: int | None, eot: int) -> Callable[..., tuple[mx.array, ...]]:
    """The backend's greedy choice for steps sent ahead of the host: the timestamp rules' ranges
    come from their state on the device, which each choice advances, and a row that has ended
    keeps choosing end-of-text.  (logits, forbidden, done, *state) -> (chosen, log-probability,
    done, *state); the state's arrays (`TimestampState.arrays`) only with `timestamp_begin`."""

    def chained(logits: mx.array, forbidden: mx.array, done: mx.array, *arrays: mx.array) -> tuple[mx.array, ...]:
        if timestamp_begin is None:
            ranges = mx.zeros((logits.shape[0], 1, 2), dtype=mx.int32)
        else:
            state = TimestampState(*arrays)
            ranges = timestamp_ranges(state, timestamp_begin, eot, mx)
        chosen, logprobs = backend.greedy_choice(logits, forbidden, ranges, timestamp_begin)
        chosen = mx.where(done, eot, chosen).astype(mx.int32)
        if timestamp_begin is not None:
            arrays = state.advance(chosen, timestamp_begin, mx).arrays()
        return chosen, logprobs, done | (chosen == eot), *arrays

    return chained


@functools.cache
def chained_candidates(backend: Backend, timestamp_begin: int | None, k: int) -> Callable[..., tuple[mx.array, ...]]:
    """The backend's `top_choices` for a step's logits, fused into the step's call: (logits,
    forbidden, ranges) -> (ids, log-probabilities)."""

    def candidates(logits: mx.array, forbidden: mx.array, ranges: mx.array) -> tuple[mx.array, mx.array]:
        return backend.top_choices(logits, forbidden, ranges, timestamp_begin, k)

    return candidates


class DeviceRules:
    """The filters' rules for tokens so far as device arrays: the vocabulary-wide mask (1, vocab),
    sent again only when it changes, and each row's ranges (batch, n >= 1, 2)."""

    def __init__(self, logit_filters: list[LogitFilter], n_vocab: int):
        self.logit_filters = logit_filters
        self.n_vocab = n_vocab
        self._host: np.ndarray | None = None
        self._device: mx.array | None = None

    def __call__(self, tokens: np.ndarray) -> tuple[mx.array, mx.array]:
        return self.mask(tokens), self.ranges(tokens)

    def mask(self, tokens: np.ndarray) -> mx.array:
        forbidden = np.zeros((1, self.n_vocab), dtype=bool)
        for logit_filter in self.logit_filters:
            logit_filter.forbid(forbidden, tokens)
        if self._host is None or not np.array_equal(forbidden, self._host):
            self._host, self._device = forbidden, mx.array(forbidden)
        return self._device

    def ranges(self, tokens: np.ndarray) -> mx.array:
        ranges = [np.zeros((tokens.shape[0], 1, 2), dtype=np.int64)]
        for logit_filter in self.logit_filters:
            rows = logit_filter.ranges(tokens)
            if rows is not None:
                ranges.append(rows)
        return mx.array(np.concatenate(ranges, axis=1), dtype=mx.int32)


# ------------------------------------------------------------ token decoders


class TokenDecoder:
    def update(self, tokens: np.ndarray, logits: np.ndarray, sum_logprobs: np.ndarray) -> tuple[np.ndarray, bool]:
        """Append each row's next token; return the new tokens and whether all are done."""
        raise NotImplementedError

    def finalize(self, tokens: np.ndarray, sum_logprobs: np.ndarray) -> tuple[list[list[list[int]]], list[list[float]]]:
        """Candidate token lists and their summed log-probabilities, per audio."""
        raise NotImplementedError

    def reset(self) -> None:
        pass


class GreedyDecoder(TokenDecoder):
    """The most likely token at temperature 0; a sample from the softmax above it."""

    def __init__(self, temperature: float, eot: int, n_group: int, seed: int):
        self.temperature = temperature
        self.eot = eot
        self.n_group = n_group
        self.rng = np.random.default_rng(seed)

    def update(self, tokens, logits, sum_logprobs):
        if self.temperature == 0:
            next_tokens = logits.argmax(axis=-1)
        else:
            probs = np.exp(log_softmax(logits / self.temperature)).astype(np.float64)
            probs /= probs.sum(axis=-1, keepdims=True)
            next_tokens = np.array([self.rng.choice(len(p), p=p) for p in probs])
        if self.temperature == 0:  # the chosen logit is the maximum: one pass fewer than shifted_logits
            chosen = logits[np.arange(len(next_tokens)), next_tokens][:, None]
            logprobs = -log_sum_exp(logits - chosen, np)[:, 0]
        else:
            shifted, norm = shifted_logits(logits, np)
            logprobs = shifted[np.arange(len(next_tokens)), next_tokens] - norm[:, 0]
        return self.append(tokens, next_tokens, logprobs, sum_logprobs)

    def append(
        self, tokens: np.ndarray, next_tokens: np.ndarray, logprobs: np.ndarray, sum_logprobs: np.ndarray
    ) -> tuple[np.ndarray, bool]:
        """Append the chosen tokens, adding their log-probabilities; a row that has ended stays ended."""
        still_going = tokens[:, -1] != self.eot
        sum_logprobs += logprobs * still_going
        next_tokens = np.where(still_going, next_tokens, self.eot)
        tokens = np.concatenate([tokens, next_tokens[:, None]], axis=1)
        return tokens, bool((tokens[:, -1] == self.eot).all())

    def finalize(self, tokens, sum_logprobs):
        tokens = np.pad(tokens, ((0, 0), (0, 1)), constant_values=self.eot)
        rows = tokens.reshape(-1, self.n_group, tokens.shape[1])
        return [[list(map(int, seq)) for seq in group] for group in rows], sum_logprobs.reshape(
            -1, self.n_group
        ).tolist()


def top_tokens(logprobs: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest of `logprobs`, largest first, the lower id first among equals
    (a stable sort's order), without sorting the whole vocabulary."""
    threshold = np.partition(logprobs, len(logprobs) - k)[len(logprobs) - k]
    candidates = np.flatnonzero(logprobs >= threshold)
    return candidates[np.argsort(-logprobs[candidates], kind="stable")][:k]


def ranked_candidates(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A backend's `top_choices` (largest first, equals in any order) in a stable sort's order of
    the vocabulary: largest first, the lower id first among equals (rare: sorted only then)."""
    if (logprobs[:, 1:] == logprobs[:, :-1]).any():
        order = np.lexsort((ids, -logprobs), axis=-1)
        ids, logprobs = np.take_along_axis(ids, order, -1), np.take_along_axis(logprobs, order, -1)
    return ids, logprobs


class BeamSearchDecoder(TokenDecoder):
    """Keeps the `beam_size` likeliest prefixes; stops once enough have finished."""

    def __init__(self, beam_size: int, eot: int, inference: Inference, patience: float | None):
        self.beam_size = beam_size
        self.eot = eot
        self.inference = inference
        self.patience = patience or 1.0
        self.max_candidates = round(beam_size * self.patience)
        if self.max_candidates <= 0:
            raise ValueError(f"patience {patience} leaves no candidate to keep")
        self.finished: list[dict[tuple[int, ...], float]] | None = None

    def reset(self) -> None:
        self.finished = None

    def update(self, tokens, logits, sum_logprobs):
        logprobs = log_softmax(logits)
        # Each beam offers its beam_size + 1 best continuations.
        ids = np.stack([top_tokens(row, self.beam_size + 1) for row in logprobs])
        return self.advance(tokens, ids, np.take_along_axis(logprobs, ids, axis=-1), sum_logprobs)

    def advance(
        self, tokens: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, sum_logprobs: np.ndarray
    ) -> tuple[np.ndarray, bool]:
        """Keep the likeliest of the rows' candidate continuations: `ids` (rows, n) with their
        log-probabilities, largest first, the lower id first among equals (as `top_tokens`)."""
        n_audio, width = tokens.shape[0] // self.beam_size, ids.shape[1]
        if self.finished is None:
            self.finished = [{} for _ in range(n_audio)]
        scores = sum_logprobs[:, None] + logprobs
        sources, chosen = [], []
        for audio in range(n_audio):
            rows = range(audio * self.beam_size, (audio + 1) * self.beam_size)
            # A row alike to an earlier one (all are, at the first step) offers the same sequences.
            first_of: dict[bytes, int] = {}
            for row in rows:
                first_of.setdefault(tokens[row].tobytes(), row)
            distinct = list(first_of.values())
            flat = scores[distinct].ravel()
            # Best first; equal scores in the order offered (a stable sort, as openai-whisper's).
            newly_finished = []
            for index in np.argsort(-flat, kind="stable"):
                row, token = distinct[index // width], int(ids[distinct[index // width], index % width])
                if token == self.eot:
                    newly_finished.append((row, float(flat[index])))
                    continue
                sources.append(row)
                chosen.append((token, float(flat[index])))
                if len(sources) == (audio + 1) * self.beam_size:
                    break
            finished = self.finished[audio]
            for row, score in newly_finished[: max(self.max_candidates - len(finished), 0)]:
                finished[(*tokens[row].tolist(), self.eot)] = score
        self.inference.reorder(sources)
        sum_logprobs[:] = [score for _, score in chosen]
        next_tokens = np.array([token for token, _ in chosen], dtype=tokens.dtype)
        done = all(len(found) >= self.max_candidates for found in self.finished)
        return np.concatenate([tokens[sources], next_tokens[:, None]], axis=1), done

    def finalize(self, tokens, sum_logprobs):
        candidates, scores = [], []
        for audio, found in enumerate(self.finished or [{} for _ in range(tokens.shape[0] // self.beam_size)]):
            if len(found) < self.beam_size:
                # Too few finished: the unfinished beams, ended here, stand in.
                for beam in np.argsort(-sum_logprobs[audio * self.beam_size : (audio + 1) * self.beam_size]):
                    row = audio * self.beam_size + int(beam)
                    found.setdefault((*map(int, tokens[row]), self.eot), float(sum_logprobs[row]))
                    if len(found) >= self.beam_size:
                        break
            candidates.append([list(sequence) for sequence in found])
            scores.append(list(found.values()))
        return candidates, scores


# ------------------------------------------------------------ sequence ranking


class SequenceRanker:
    def rank(self, tokens: list[list[list[int]]], sum_logprobs: list[list[float]]) -> list[int]:
        """Index of the chosen candidate for each audio."""
        raise NotImplementedError


class MaximumLikelihoodRanker(SequenceRanker):
    """Highest log-probability, divided by the length or by Google NMT's length penalty."""

    def __init__(self, length_penalty: float | None):
        self.length_penalty = length_penalty

    def rank(self, tokens, sum_logprobs):
        def score(logprob: float, length: int) -> float:
            if self.length_penalty is None:
                return logprob / length
            return logprob / ((5 + length) / 6) ** self.length_penalty

        return [
            int(np.argmax([score(lp, len(seq)) for seq, lp in zip(group, logprobs)]))
            for group, logprobs in zip(tokens, sum_logprobs)
        ]


# ------------------------------------------------------------------- the task


def _as_tokens(tokenizer: Tokenizer, text_or_tokens: str | list[int]) -> list[int]:
    if isinstance(text_or_tokens, str):
        return tokenizer.encode(" " + text_or_tokens.strip())
    return list(text_or_tokens)


def detect_language(
    model: Whisper, mel: mx.array, tokenizer: Tokenizer | None = None
) -> tuple[mx.array, dict[str, float] | list[dict[str, float]]]:
    """The likeliest language token of each window and every language's probability, as
    openai-whisper returns them: for one window a token (a 0-d array) and a dict, for a batch
    a (batch,) array and a list of dicts.

    `mel` is a log-mel window, (n_mels, frames) as `log_mel_spectrogram` makes it or
    (frames, n_mels), with or without a batch axis in front; or already encoded audio.
    """
    if not model.is_multilingual:
        raise ValueError("this model is English-only: it cannot detect languages")
    tokenizer = tokenizer or get_tokenizer(True, num_languages=model.num_languages)
    mel = frames_first(mel, model.dims.n_mels)
    single = mel.ndim == 2
    if single:
        mel = mel[None]
    encoded = mel.shape[-2:] == (model.dims.n_audio_ctx, model.dims.n_audio_state)
    audio_features = mel if encoded else model.embed_audio(mel)
    logits = np.array(model.logits(mx.array([[tokenizer.sot]] * mel.shape[0]), audio_features)[:, 0].astype(mx.float32))
    language_tokens = np.array(tokenizer.all_language_tokens)
    language_logits = logits[:, language_tokens]
    probs = np.exp(log_softmax(language_logits))
    tokens = mx.array(language_tokens[language_logits.argmax(axis=-1)])
    codes = tokenizer.all_language_codes
    language_probs = [dict(zip(codes, map(float, row))) for row in probs]
    return (tokens[0], language_probs[0]) if single else (tokens, language_probs)


class Steps:
    """How the decoding loop gets each row's next token: `choose` from given logits, `next` from a
    step of the model; `finish` once the loop ends."""

    def __init__(self, task: DecodingTask, inference: Inference, decoder: TokenDecoder):
        self.task = task
        self.inference = inference
        self.decoder = decoder

    def choose(self, tokens: np.ndarray, logits: mx.array, sum_logprobs: np.ndarray) -> tuple[np.ndarray, bool]:
        raise NotImplementedError

    def next(self, tokens: np.ndarray, sum_logprobs: np.ndarray) -> tuple[np.ndarray, bool]:
        return self.choose(tokens, self.inference.device_logits(tokens)[:, -1], sum_logprobs)

    def finish(self, tokens: np.ndarray) -> None:
        pass


class HostSteps(Steps):
    """The logits come to the host, where the filters forbid tokens and the token decoder chooses
    (greedy, sampling, beam search)."""

    def choose(self, tokens, logits, sum_logprobs):
        logits = np.array(logits.astype(mx.float32))
        for logit_filter in self.task.logit_filters:
            logit_filter.apply(logits, tokens)
        return self.decoder.update(tokens, logits, sum_logprobs)


class BeamSteps(Steps):
    """Beam search whose candidates are chosen where the logits are: each row's beam_size + 1
    likeliest allowed tokens come to the host, not the whole vocabulary.  A step and its
    candidates' choice go as one call, under the vocabulary-wide mask of the first step after
    the initial tokens (the same from there on)."""

    def __init__(self, task: DecodingTask, inference: Inference, decoder: BeamSearchDecoder):
        super().__init__(task, inference, decoder)
        self.rules = DeviceRules(task.logit_filters, task.model.dims.n_vocab)
        self.candidates = chained_candidates(inference.backend, task.timestamp_begin, decoder.beam_size + 1)
        self.forbidden: mx.array | None = None

    def choose(self, tokens, logits, sum_logprobs):
        k = self.decoder.beam_size + 1
        ids, logprobs = self.inference.backend.top_choices(logits, *self.rules(tokens), self.task.timestamp_begin, k)
        return self._advance(tokens, ids, logprobs, sum_logprobs)

    def next(self, tokens, sum_logprobs):
        if self.forbidden is None:
            self.forbidden = self.rules.mask(tokens)
        last = mx.array(tokens[:, -1:], dtype=mx.int32)
        ids, logprobs = self.inference.chained_step(last, self.candidates, self.forbidden, self.rules.ranges(tokens))
        return self._advance(tokens, ids, logprobs, sum_logprobs)

    def _advance(self, tokens, ids: mx.array, logprobs: mx.array, sum_logprobs):
        return self.decoder.advance(tokens, *ranked_candidates(np.array(ids), np.array(logprobs)), sum_logprobs)


class DeviceSteps(Steps):
    """Greedy choices made where the logits are, under the rules' state kept there too: each step
    is sent before the previous one's ids are read, so that the host's sending of a step overlaps
    the device's running of the last one."""

    def __init__(self, task: DecodingTask, inference: Inference, decoder: GreedyDecoder):
        super().__init__(task, inference, decoder)
        self.rules = DeviceRules(task.logit_filters, task.model.dims.n_vocab)
        self.chained = chained_choice(inference.backend, task.timestamp_begin, task.tokenizer.eot)
        self.pending: tuple[mx.array, ...] | None = None
        self.started = False

    def choose(self, tokens, logits, sum_logprobs):
        chosen, logprobs = self.inference.backend.greedy_choice(logits, *self.rules(tokens), self.task.timestamp_begin)
        return self.decoder.append(tokens, np.array(chosen).astype(np.int64), np.array(logprobs), sum_logprobs)

    def next(self, tokens, sum_logprobs):
        if not self.started:
            self.started = True
            eot = self.task.tokenizer.eot
            self.forbidden = self.rules.mask(tokens)  # the same for every row from here on
            timestamps = next((f for f in self.task.logit_filters if isinstance(f, ApplyTimestampRules)), None)
            state = [mx.array(a) for a in timestamps.state(tokens).arrays()] if timestamps else []
            self.pending = self._send(mx.array(tokens[:, -1:], dtype=mx.int32), mx.array(tokens[:, -1] == eot), state)
        if self.pending is None:  # the context is full: no step is left to take
            return tokens, True
        chosen, logprobs, done, *state = self.pending
        # The step after this one, if the loop may take its token.
        room = tokens.shape[1] + 1 - self.task.sample_begin < self.task.sample_len
        self.pending = self._send(chosen[:, None], done, state) if room else None
        return self.decoder.append(tokens, np.array(chosen).astype(np.int64), np.array(logprobs), sum_logprobs)

    def _send(self, last: mx.array, done: mx.array, state: list[mx.array]) -> tuple[mx.array, ...] | None:
        if self.inference.n_cached >= self.task.n_ctx:
            return None
        step = self.inference.chained_step(last, self.chained, self.forbidden, done, *state)
        mx.async_eval(step)
        return step

    def finish(self, tokens):
        if self.pending is not None:  # a step sent past the end: its position holds nothing
            self.inference.rewind(tokens.shape[1] - 1)


class DecodingTask:
    def __init__(self, model: Whisper, options: DecodingOptions, guess: list[int] | None = None):
        """`guess`: tokens this window's text likely starts with (say, a live transcript's last
        text), checked in the first pass over the initial tokens: those the decoding would choose
        anyway are taken without a step each.  The tokens are the same with or without it."""
        self.model = model
        language = options.language or ("en" if not model.is_multilingual else None)
        self.tokenizer = get_tokenizer(
            model.is_multilingual, num_languages=model.num_languages, language=language, task=options.task
        )
        self.options = self._verify(options)
        self.n_group = options.beam_size or options.best_of or 1
        self.n_ctx = model.dims.n_text_ctx
        self.sample_len = options.sample_len or self.n_ctx // 2
        self.guess = list(guess or [])[: self.sample_len - 1]
        self.sot_sequence = list(self.tokenizer.sot_sequence)
        if options.without_timestamps:
            self.sot_sequence = list(self.tokenizer.sot_sequence_including_notimestamps)
        self.initial_tokens = self._initial_tokens()
        self.sample_begin = len(self.initial_tokens)
        self.sot_index = self.initial_tokens.index(self.tokenizer.sot)
        self.logit_filters = self._logit_filters()
        self.timestamp_begin = None if options.without_timestamps else self.tokenizer.timestamp_begin

    @staticmethod
    def _verify(options: DecodingOptions) -> DecodingOptions:
        if options.beam_size is not None and options.best_of is not None:
            raise ValueError("best_of is for sampling and beam_size for beam search: give one of them")
        if options.temperature == 0 and options.best_of is not None:
            raise ValueError("best_of needs a temperature above 0")
        if options.patience is not None and options.beam_size is None:
            raise ValueError("patience needs beam_size")
        if options.length_penalty is not None and not 0 <= options.length_penalty <= 1:
            raise ValueError("length_penalty must be between 0 and 1")
        return options

    def _initial_tokens(self) -> list[int]:
        tokens = list(self.sot_sequence)
        if self.options.prefix:
            prefix = _as_tokens(self.tokenizer, self.options.prefix)
            tokens += prefix[-(self.n_ctx // 2 - self.sample_len) :] if self.sample_len < self.n_ctx // 2 else prefix
        if self.options.prompt:
            prompt = _as_tokens(self.tokenizer, self.options.prompt)
            tokens = [self.tokenizer.sot_prev, *prompt[-(self.n_ctx // 2 - 1) :], *tokens]
        return tokens

    def _suppressed_tokens(self) -> list[int]:
        wanted = self.options.suppress_tokens
        if isinstance(wanted, str):
            wanted = [int(t) for t in wanted.split(",") if t.strip()]
        suppressed = set(wanted or [])
        if -1 in suppressed:
            suppressed.discard(-1)
            suppressed.update(self.tokenizer.non_speech_tokens)
        t = self.tokenizer
        suppressed.update([t.transcribe, t.translate, t.sot, t.sot_prev, t.sot_lm, t.no_speech])
        return sorted(suppressed)

    def _logit_filters(self) -> list[LogitFilter]:
        filters: list[LogitFilter] = []
        if self.options.suppress_blank:
            filters.append(SuppressBlank(self.tokenizer, self.sample_begin))
        filters.append(SuppressTokens(self._suppressed_tokens()))
        if not self.options.without_timestamps:
            max_index = None
            if self.options.max_initial_timestamp:
                precision = CHUNK_LENGTH / self.model.dims.n_audio_ctx
                max_index = round(self.options.max_initial_timestamp / precision)
            filters.append(ApplyTimestampRules(self.tokenizer, self.sample_begin, max_index))
        return filters

    def _token_decoder(self, inference: Inference) -> TokenDecoder:
        if self.options.beam_size is not None:
            return BeamSearchDecoder(self.options.beam_size, self.tokenizer.eot, inference, self.options.patience)
        return GreedyDecoder(self.options.temperature, self.tokenizer.eot, self.n_group, self.options.seed)

    def _audio_features(self, mel: mx.array) -> mx.array:
        if mel.shape[-2:] == (self.model.dims.n_audio_ctx, self.model.dims.n_audio_state):
            return mel.astype(self.model.dtype)
        if mel.shape[-2] != N_FRAMES:
            raise ValueError(f"a window is {N_FRAMES} frames; got mel of shape {tuple(mel.shape)}")
        return self.model.embed_audio(mel)

    def _languages(self, audio_features: mx.array) -> tuple[list[str], list[dict[str, float]] | None]:
        n_audio = audio_features.shape[0]
        if self.options.language is not None or not self.model.is_multilingual:
            return [self.tokenizer.language or "en"] * n_audio, None
        _, probs = detect_language(self.model, audio_features, self.tokenizer)
        return [max(p, key=p.get) for p in probs], probs

    def _steps(self, inference: Inference, decoder: TokenDecoder) -> Steps:
        if inference.backend.chooses_on_device and isinstance(decoder, BeamSearchDecoder):
            return BeamSteps(self, inference, decoder)
        if inference.backend.chooses_on_device and isinstance(decoder, GreedyDecoder) and decoder.temperature == 0:
            return DeviceSteps(self, inference, decoder)
        return HostSteps(self, inference, decoder)

    def _sample(self, inference: Inference, decoder: TokenDecoder, tokens: np.ndarray):
        """The decoding loop: one pass over the initial tokens (and the guess), then a step a token."""
        sum_logprobs = np.zeros(tokens.shape[0], dtype=np.float64)
        guessed = np.concatenate([tokens, np.tile(np.array(self.guess, dtype=tokens.dtype), (tokens.shape[0], 1))], 1)
        # From start-of-transcript on: the prompt before it needs no logits.
        all_logits = inference.device_logits(guessed, positions=guessed.shape[1] - self.sot_index)
        sot_probs = mx.softmax(all_logits[:, 0].astype(mx.float32), axis=-1, precise=True)
        no_speech_probs = np.array(sot_probs[:, self.tokenizer.no_speech]).astype(np.float64)
        steps = self._steps(inference, decoder)
        # The guess's tokens are accepted as long as they are what the decoding would choose.
        for step in range(len(self.guess) + 1):
            logits = all_logits[:, self.sample_begin - 1 - self.sot_index + step]
            tokens, completed = steps.choose(tokens, logits, sum_logprobs)
            if completed or step == len(self.guess) or tokens[0, -1] != self.guess[step]:
                break
        if self.guess:  # the cache holds the whole guess: go on after what was accepted
            inference.rewind(tokens.shape[1] - 1)
        while not completed and tokens.shape[1] - self.sample_begin < self.sample_len and tokens.shape[1] <= self.n_ctx:
            tokens, completed = steps.next(tokens, sum_logprobs)
        steps.finish(tokens)
        return tokens, sum_logprobs, no_speech_probs

    def run(self, mel: mx.array) -> list[DecodingResult]:
        if mel.ndim == 2:
            mel = mel[None]
        audio_features = self._audio_features(mel)
        n_audio = audio_features.shape[0]
        languages, language_probs = self._languages(audio_features)
        if self.options.language is None and self.model.is_multilingual:
            # Each window decodes in its own detected language.
            tasks = [DecodingTask(self.model, replace(self.options, language=lang)) for lang in languages]
            if len(set(languages)) > 1:
                return [
                    replace(task.run(audio_features[i : i + 1])[0], language_probs=language_probs[i])
                    for i, task in enumerate(tasks)
                ]
            return [replace(r, language_probs=p) for r, p in zip(tasks[0].run(audio_features), language_probs)]

        inference = Inference(self.model, audio_features, self.n_group)
        decoder = self._token_decoder(inference)
        tokens = np.tile(np.array(self.initial_tokens, dtype=np.int64), (n_audio * self.n_group, 1))
        tokens, sum_logprobs, no_speech_probs = self._sample(inference, decoder, tokens)
        no_speech_probs = no_speech_probs[:: self.n_group]
        candidates, scores = decoder.finalize(tokens, sum_logprobs)
        candidates = [
            [seq[self.sample_begin : seq.index(self.tokenizer.eot, self.sample_begin)] for seq in group]
            for group in candidates
        ]
        chosen = MaximumLikelihoodRanker(self.options.length_penalty).rank(candidates, scores)
        results = []
        for i in range(n_audio):
            best_tokens = candidates[i][chosen[i]]
            text = self.tokenizer.decode(best_tokens).strip()
            results.append(
                DecodingResult(
                    audio_features=audio_features[i],
                    language=languages[i],
                    tokens=best_tokens,
                    text=text,
                    avg_logprob=scores[i][chosen[i]] / (len(best_tokens) + 1),
                    no_speech_prob=float(no_speech_probs[i]),
                    temperature=self.options.temperature,
                    compression_ratio=compression_ratio(text),
                )
            )
        return results


def decode(
    model: Whisper, mel: mx.array, options: DecodingOptions = DecodingOptions(), **kwargs
) -> DecodingResult | list[DecodingResult]:
    """Decode 30-second log-mel window(s): (n_mels, frames) as `log_mel_spectrogram` makes
    them, or (frames, n_mels); with or without a batch axis in front."""
    if kwargs:
        options = replace(options, **kwargs)
    mel = frames_first(mel, model.dims.n_mels)
    single = mel.ndim == 2
    results = DecodingTask(model, options).run(mel)
    return results[0] if single else results
