"""Whisper's decoding rules as array functions, on numpy (the host) or MLX (where the logits are).

`decoding.ApplyTimestampRules` is the specification, on numpy; `greedy_choice` makes the same
choice with MLX's ops where the logits are, and backends may make it faster still
(`whisper.kernels.greedy_choice`); the tests hold each against the specification.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import mlx.core as mx
import numpy as np

ArrayLike = mx.array | np.ndarray  # the same code runs on either (numpy on the host, MLX on a device)


def in_ranges(ranges: ArrayLike, n_vocab: int, xp: ModuleType = mx) -> ArrayLike:
    """(batch, vocab) mask of the tokens inside any of each row's ranges: `ranges` (batch, n, 2) holds
    [start, stop) pairs (start >= stop: none). `xp` is mlx.core or numpy."""
    vocab = xp.arange(n_vocab)
    return ((vocab >= ranges[..., :1]) & (vocab < ranges[..., 1:])).any(axis=1)


def log_sum_exp(shifted: ArrayLike, xp: ModuleType = mx, block: int = 256) -> ArrayLike:
    """log(sum(exp(shifted))) over the last axis of (rows, n) values at most 0, kept as (rows, 1);
    `xp` is mlx.core or numpy, whichever holds the values.

    Summed in blocks, then the block sums: MLX's one float32 running sum from 1 (the top token)
    drops every term below 6e-8, and tens of thousands of them made log-probabilities 1e-5 too high."""
    if xp is np:  # numpy sums pairwise already
        return np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    rows, n = shifted.shape
    padded = xp.concatenate([shifted, xp.full((rows, -n % block), -xp.inf, dtype=shifted.dtype)], axis=1)
    return xp.log(xp.exp(padded).reshape(rows, -1, block).sum(axis=-1).sum(axis=-1, keepdims=True))


def shifted_logits(x: ArrayLike, xp: ModuleType) -> tuple[ArrayLike, ArrayLike]:
    """x minus each row's maximum, and the log of the sum of its exponentials (rows, 1): the
    log-probabilities are their difference, computed only where needed."""
    shifted = x - xp.max(x, axis=-1, keepdims=True)
    return shifted, log_sum_exp(shifted, xp)


def log_softmax(x: ArrayLike, xp: ModuleType = np) -> ArrayLike:
    """Log-probabilities over the last axis of (rows, n) logits; `xp` is numpy or mlx.core."""
    shifted, norm = shifted_logits(x, xp)
    return shifted - norm


def timestamps_win(logits: ArrayLike, timestamp_begin: int, xp: ModuleType = mx) -> ArrayLike:
    """Rows (batch,) where all timestamp tokens together are likelier than any one text token.
    `xp` is mlx.core or numpy (whose -inf arithmetic warns: callers silence it)."""
    # Each part's maximum once (the whole's is the larger): subtracting keeps the order and the bits.
    text_top = logits[:, :timestamp_begin].max(axis=-1, keepdims=True)
    top = xp.maximum(text_top, logits[:, timestamp_begin:].max(axis=-1, keepdims=True))
    shifted = logits - top
    norm = log_sum_exp(shifted, xp)
    timestamps = shifted[:, timestamp_begin:] - norm
    # The likeliest text token's log-probability.
    best_text = (text_top - top - norm)[:, 0]
    top = xp.max(timestamps, axis=-1, keepdims=True)
    # Every timestamp forbidden: they cannot win (and -inf - -inf must not make a NaN).
    shifted = xp.where(xp.isinf(top), -xp.inf, timestamps - top)
    return (top + log_sum_exp(shifted, xp))[:, 0] > best_text


@dataclass(frozen=True)
class TimestampState:
    """What the timestamp rules need of each row's sampled tokens (batch,): whether the last and
    the one before it were timestamps, the latest timestamp token, and whether there was one;
    numpy arrays on the host, MLX arrays where a GPU decodes several steps ahead."""

    last: ArrayLike
    penultimate: ArrayLike
    latest: ArrayLike
    seen: ArrayLike

    def arrays(self) -> tuple[ArrayLike, ArrayLike, ArrayLike, ArrayLike]:
        return self.last, self.penultimate, self.latest, self.seen

    def advance(self, chosen: ArrayLike, timestamp_begin: int, xp: ModuleType) -> TimestampState:
        """The state after each row's `chosen` token."""
        is_timestamp = chosen >= timestamp_begin
        latest = xp.where(is_timestamp, chosen, self.latest).astype(self.latest.dtype)
        return TimestampState(is_timestamp, self.last, latest, self.seen | is_timestamp)


def timestamp_ranges(state: TimestampState, begin: int, eot: int, xp: ModuleType) -> ArrayLike:
    """The token ids the timestamp rules forbid each row next, as `LogitFilter.ranges`
    (batch, 2, 2); `xp` is numpy or mlx.core, whichever holds the state."""
    opened = state.last & xp.logical_not(state.penultimate)
    pair_closed = state.last & state.penultimate
    nothing = xp.zeros(state.last.shape, dtype=xp.int32)
    # After a closed pair text must follow; an opened pair must close (or the text end).
    stop = xp.where(pair_closed, np.iinfo(np.int32).max, xp.where(opened, eot, 0))
    first = xp.stack([xp.where(pair_closed, begin, nothing), stop], axis=-1)
    # A segment may start where the last one ended, but must not be empty.
    latest = state.latest + xp.logical_not(opened)
    second = xp.stack([xp.where(state.seen, begin, nothing), xp.where(state.seen, latest, nothing)], axis=-1)
    return xp.stack([first, second], axis=1)


def allowed_logits(
    logits: mx.array, forbidden: mx.array, ranges: mx.array, timestamp_begin: int | None
) -> mx.array:
    """The logits as float32, -inf where not allowed: `forbidden` (1 or rows, vocab) and `ranges`
    (rows, n, 2, as `LogitFilter.ranges`) say which tokens are not; with `timestamp_begin`, text
    tokens are not where the timestamps together are likelier (`timestamps_win`)."""
    forbidden = forbidden | in_ranges(ranges, logits.shape[-1])
    logits = mx.where(forbidden, -mx.inf, logits.astype(mx.float32))
    if timestamp_begin is not None:
        text = mx.arange(logits.shape[-1]) < timestamp_begin
        logits = mx.where(timestamps_win(logits, timestamp_begin)[:, None] & text, -mx.inf, logits)
    return logits


def greedy_choice(
    logits: mx.array, forbidden: mx.array, ranges: mx.array, timestamp_begin: int | None
) -> tuple[mx.array, mx.array]:
    """Each row's likeliest allowed token (`allowed_logits`) and its log-probability, with MLX's ops."""
    logits = allowed_logits(logits, forbidden, ranges, timestamp_begin)
    chosen = mx.argmax(logits, axis=-1)
    return chosen, mx.take_along_axis(log_softmax(logits, mx), chosen[:, None], axis=-1)[:, 0]


def top_choices(
    logits: mx.array, forbidden: mx.array, ranges: mx.array, timestamp_begin: int | None, k: int
) -> tuple[mx.array, mx.array]:
    """Each row's k likeliest allowed tokens (`allowed_logits`), largest first (equals in any
    order), and their log-probabilities: (rows, k) each, for a beam search to take the rows' few
    candidates from where the logits are instead of the whole vocabulary."""
    logprobs = log_softmax(allowed_logits(logits, forbidden, ranges, timestamp_begin), mx)
    ids = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
    ids = mx.take_along_axis(ids, mx.argsort(-mx.take_along_axis(logprobs, ids, axis=-1), axis=-1), axis=-1)
    return ids, mx.take_along_axis(logprobs, ids, axis=-1)
