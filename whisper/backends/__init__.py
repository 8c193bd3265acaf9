"""How a loaded model runs: one backend per model, chosen when it loads.

A decoding needs a few operations of the model, and each backend does them its own way:

- `encode`: the encoder's features of log-mel windows;
- `audio_memory`: what the decoder's cross-attention reads of those features, once per window,
  shared by the `group` rows (beams, samples) that decode each window;
- `new_cache`, `forward` (several tokens per row, such as a prompt), `step` (one token per row;
  `step_then` with a function of the logits fused in), `reorder` (beam search's surviving rows)
  and `forget` (positions taken back): the decoder over its self-attention cache;
- `greedy_choice` and `top_choices`: each row's likeliest allowed token (greedy decoding), or its
  k likeliest (a beam's candidates), under the decoding rules.

`Backend`, here, is the plain model's own code (`whisper.model`): it runs anywhere MLX does and is
the reference every other backend is tested against.  `whisper.backends.cpu` runs the compiled CPU
kernels (`whisper.kernels`) and `whisper.backends.gpu` a fixed-size cache that steps compile over,
with CUDA kernels for a step's products on NVIDIA GPUs.
"""

from __future__ import annotations

import functools
from typing import Any

import mlx.core as mx
from mlx import nn

from ..model import Whisper
from ..rules import greedy_choice, top_choices

# What a backend's cross-attention reads of a window's audio, and its self-attention cache: each
# backend's own structure, opaque to the decoding.
AudioMemory = Any
Cache = Any

# load_model's quantization: MLX's affine format, a scale and a bias per this many inputs of a row.
QUANTIZATION_GROUP = 64


class Backend:
    """The plain model's passes, with a cache that grows by concatenation."""

    name = "mlx"
    chooses_on_device = False  # MLX's ops choose more slowly than numpy on the host, one lane at a time

    def __init__(self, model: Whisper):
        self.model = model

    @staticmethod
    def quantize(model: Whisper, bits: int) -> None:
        """`load_model(..., quantize=bits)`, before the backend is made: the weights it reads
        quantized, here every linear layer and embedding."""
        nn.quantize(model, group_size=QUANTIZATION_GROUP, bits=bits)

    def encode(self, mel: mx.array, *, partial: bool = False) -> mx.array:
        return self.model.encoder(mel, partial=partial)

    def audio_memory(self, features: mx.array, group: int = 1) -> AudioMemory:
        """The features themselves: the decoder's first pass, one row per window, computes each
        layer's keys and values of them into its cache, which `reorder` then gives the window's rows."""
        return features

    def new_cache(self, rows: int) -> Cache:
        return None

    def forward(
        self, tokens: mx.array, audio: AudioMemory, cache: Cache, offset: int | mx.array, positions: int | None = None
    ) -> tuple[mx.array, Cache]:
        """Logits (rows, n, vocab) of `tokens` (rows, n) at positions `offset` onwards, after the
        positions already cached, or of their last `positions`; and the cache with the tokens'
        keys and values."""
        logits, cache, _ = self.model.decoder(tokens, audio, cache)
        return logits if positions is None else logits[:, -positions:], cache

    def step(self, tokens: mx.array, audio: AudioMemory, cache: Cache, offset: mx.array) -> tuple[mx.array, Cache]:
        """Logits (rows, vocab) of one more token (rows, 1) per row, at position `offset` (int32,
        one element)."""
        logits, cache = self.forward(tokens, audio, cache, offset)
        return logits[:, -1], cache

    def step_then(self, then):
        """`step` followed by `then(logits, *extra)`: (tokens, audio, cache, offset, *extra) ->
        (then's result, cache)."""

        def stepped(tokens, audio, cache, offset, *extra):
            logits, cache = self.step(tokens, audio, cache, offset)
            return then(logits, *extra), cache

        return stepped

    def reorder(self, cache: Cache, sources: list[int], n_cached: int) -> Cache:
        """The cache whose row i holds row sources[i]'s positions [0, n_cached)."""
        index = mx.array(sources)
        return [tuple((k[index], v[index]) for k, v in layer) for layer in cache]

    def forget(self, cache: Cache, n_kept: int) -> Cache:
        """The cache with positions from `n_kept` on taken back."""
        if cache is None:
            return None
        return [((k[:, :n_kept], v[:, :n_kept]), cross) for (k, v), cross in cache]

    def greedy_choice(
        self, logits: mx.array, forbidden: mx.array, ranges: mx.array, timestamp_begin: int | None
    ) -> tuple[mx.array, mx.array]:
        """(logits (rows, vocab), forbidden (1 or rows, vocab), ranges (rows, n, 2) as in
        `decoding.LogitFilter.ranges`) -> each row's likeliest allowed token and its log-probability;
        with `timestamp_begin`, the rule that likelier timestamps win."""
        return _compiled(greedy_choice, timestamp_begin)(logits, forbidden, ranges)

    def top_choices(
        self, logits: mx.array, forbidden: mx.array, ranges: mx.array, timestamp_begin: int | None, k: int
    ) -> tuple[mx.array, mx.array]:
        """Each row's k likeliest allowed tokens (rows, k), largest first (equals in any order), and
        their log-probabilities, under the rules as in `greedy_choice`: a beam's candidates."""
        return _compiled(top_choices, timestamp_begin, k)(logits, forbidden, ranges)


@functools.cache
def _compiled(choice, timestamp_begin: int | None, *k: int):
    return mx.compile(lambda logits, forbidden, ranges: choice(logits, forbidden, ranges, timestamp_begin, *k))


def backend_type(device: mx.Device | None = None, *, kernels: bool = True) -> type[Backend]:
    """The fastest backend on `device` (MLX's default device if None): the GPU's on a GPU, the
    compiled kernels' on a CPU where they load, else the plain model's.  With `kernels` False,
    the plain model's wherever MLX computes on a CPU."""
    device = device or mx.default_device()
    if device == mx.gpu:
        from .gpu import GpuBackend

        return GpuBackend
    if kernels:
        from .cpu import CpuBackend, kernels_load

        if kernels_load():
            return CpuBackend
    return Backend


def backend_for(model: Whisper, device: mx.Device | None = None, *, kernels: bool = True) -> Backend:
    """The fastest backend for this model on `device` (see `backend_type`)."""
    return backend_type(device, kernels=kernels)(model)


def prepare(model: Whisper, backend: Backend | None = None) -> Whisper:
    """Give the model its backend (by default `backend_for(model)`), which readies the weights
    for it now, at load time."""
    model.backend = backend or backend_for(model)
    return model
