"""Whisper's encoder-decoder Transformer in MLX.

Parameter names follow openai-whisper's, except the MLP layers (`mlp1`, `mlp2`), and
arrays are channels-last as MLX expects: a mel input is (batch, frames, n_mels).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten

from . import cuda, kernels

# The decoder's self-attention cache: per layer (keys, values), allocated once per decode and
# written in place by position, so that every decoding step has the same shapes and
# `mx.compile` traces it once.  Two layouts: (batch, n_text_ctx, state), which the CPU kernels
# read, and elsewhere (batch, heads, n_text_ctx, head_dim + HEAD_PAD), the "padded heads".
KVCache = list[tuple[mx.array, mx.array]]

# What a decoder layer's cross-attention reads of a window's audio: its keys and values (batch,
# frames, state) each; or, where a CPU step attends over the audio features themselves
# (`TextDecoder.audio_memory`), the features and their panels in a dict shared by every layer,
# whose keys and values other passes compute when they need them.
CrossSource = tuple[mx.array, mx.array] | dict[str, mx.array]
# The whole decoder's: each layer's keys and values (`TextDecoder.cross_kv`), or that dict.
AudioMemory = list[tuple[mx.array, mx.array]] | dict[str, mx.array]

# MLX's single-query attention kernel (the GPU's) takes no mask, and without one a step would
# attend to the cache's unwritten positions too.  So each head gets extra components, 64 -> 96,
# a head size the kernel takes: queries hold 1 in the first of them, written keys 0, unwritten
# keys UNWRITTEN_KEY, which scores those positions far below any other (softmax weight 0).
HEAD_PAD = 32
UNWRITTEN_KEY = -1e4


@dataclass(frozen=True)
class ModelDimensions:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's fixed encoder positions: sines then cosines over log-spaced timescales."""
    log_increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-log_increment * np.arange(channels // 2))
    scaled_time = np.arange(length)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled_time), np.cos(scaled_time)], axis=1).astype(np.float32)


def linear(
    layer: nn.Linear | nn.Embedding,
    x: mx.array,
    *,
    norm: nn.LayerNorm | None = None,
    residual: mx.array | None = None,
    gelu: bool = False,
) -> mx.array:
    """`layer(norm(x))`, then exact GELU, then plus `residual`, as asked (an embedding multiplies
    by its transpose).  A decoding step's few rows take one pass over the weights: on NVIDIA GPUs
    one kernel for all of it (`cuda.fused_linear`), on CPUs `kernels.linear`."""
    quantized = isinstance(layer, nn.QuantizedLinear)  # packed weights: only MLX's quantized product reads them
    if not quantized:
        norm_arrays = None if norm is None else (norm.weight, norm.bias, norm.eps)
        fused = cuda.fused_linear(x, layer.weight, layer.get("bias"), norm=norm_arrays, residual=residual, gelu=gelu)
        if fused is not None:
            return fused
    if norm is not None:
        x = norm(x)
    many_rows = x.dtype == mx.float32 and not kernels.few_rows(x)
    if many_rows and not quantized and kernels.multiplies_in_panels(layer.weight):
        return kernels.panel_product(x, layer.weight, layer.get("bias"), gelu=gelu, residual=residual)
    y = layer(x) if quantized else kernels.linear(x, layer.weight, layer.get("bias"))
    if gelu:
        y = kernels.gelu(y)
    return y if residual is None else residual + y


def half_if_exact(weight: mx.array) -> mx.array:
    """A float32 weight as float16 if that changes no value (the bundled checkpoints are float16,
    so their float32 weights hold float16 values), else the weight as it is."""
    if weight.dtype != mx.float32:
        return weight
    half = weight.astype(mx.float16)
    mx.eval(half)
    # Compared in slices: a whole float32 copy of the embedding would add 80-106 MB to the
    # process's peak memory.
    rows = range(0, weight.shape[0], 4096)
    exact = all(mx.array_equal(half[i : i + 4096].astype(mx.float32), weight[i : i + 4096]).item() for i in rows)
    return half if exact else weight


def store_in_half(layers: list[nn.Module]) -> list[nn.Module]:
    """Each layer's float32 matrix replaced by its float16 copy where that changes no value
    (`half_if_exact`), each matrix looked at once; the layers whose matrix was replaced.  The
    CPU kernels widen float16 weights exactly: the same products from half the memory."""
    halved = []
    for layer in layers:
        weight = layer.weight
        if weight.dtype != mx.float32 or layer.get("_not_half") is weight:
            continue
        half = half_if_exact(weight)
        if half is weight:
            layer._not_half = weight  # not looked at again
        else:
            layer.weight = half
            halved.append(layer)
    return halved


def convolve_gelu(layer: nn.Conv1d, x: mx.array) -> mx.array:
    """GELU(layer(x)) for x (batch, frames, channels).  Where the panel product takes the layer's
    matrix (out, width * in): one product over the `width` shifted (strided) copies of x side by
    side, the columns that matrix multiplies."""
    matrix = layer.weight.reshape(layer.weight.shape[0], -1)
    if x.dtype != mx.float32 or layer.dilation != 1 or layer.groups != 1 or not kernels.multiplies_in_panels(matrix):
        return kernels.gelu(layer(x))
    width, pad, stride = layer.weight.shape[1], layer.padding, layer.stride
    padded = mx.pad(x, [(0, 0), (pad, pad), (0, 0)])
    last = padded.shape[1] - width  # the last window's first frame
    shifted = [padded[:, k : k + last + 1 : stride] for k in range(width)]
    return kernels.panel_product(mx.concatenate(shifted, axis=-1), matrix, layer.get("bias"), gelu=True)


def linear_layer(weight: mx.array, bias: mx.array | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


def dense_weight(layer: nn.Linear) -> mx.array:
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    return layer.weight


def pad_heads(t: mx.array, n_head: int, first: float = 0.0) -> mx.array:
    """t (n_head * head_dim, ...) with HEAD_PAD rows after each head's rows, the first of them
    `first`, the others 0."""
    head_dim = t.shape[0] // n_head
    extra = mx.zeros((n_head, HEAD_PAD, *t.shape[1:]), t.dtype)
    extra[:, 0] = first
    padded = mx.concatenate([t.reshape(n_head, head_dim, *t.shape[1:]), extra], axis=1)
    return padded.reshape(n_head * (head_dim + HEAD_PAD), *t.shape[1:])


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm`, through `kernels.layer_norm` (the same bits; MLX's own is one thread's ops)."""

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.head_dim = n_state // n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def project_kv(self, source: mx.array) -> tuple[mx.array, mx.array]:
        return linear(self.key, source), linear(self.value, source)

    def attend_cache(
        self, x: mx.array, cache: tuple[mx.array, mx.array], offset: mx.array
    ) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        """Self-attention of x (batch, n, state) at positions `offset` onwards over a cache in the
        CPU kernels' layout: writes x's keys and values into it there, attends over it; returns
        the output and the updated cache."""
        k, v = self.project_kv(x)
        k = mx.slice_update(cache[0], k, offset, axes=(1,))
        v = mx.slice_update(cache[1], v, offset, axes=(1,))
        return linear(self.out, kernels.cached_attention(linear(self.query, x), k, v, offset, self.n_head)), (k, v)

    def pad_weights(self) -> None:
        """The projections for the padded-heads cache, made again only when the weights were
        replaced: queries, keys and values come out padded; the output projection ignores the padding."""
        weights = hash(tuple(id(a) for _, a in tree_flatten(self.parameters())))
        if getattr(self, "_padded_for", None) == weights:
            return
        self._padded_for = weights
        n = self.n_head
        value_bias = pad_heads(self.value.bias, n)
        # Keys and values from one product: the keys' half of its bias is 0 (keys have none).
        self._padded = {
            "query": linear_layer(pad_heads(dense_weight(self.query), n), pad_heads(self.query.bias, n, first=1.0)),
            "key_value": linear_layer(
                mx.concatenate([pad_heads(dense_weight(self.key), n), pad_heads(dense_weight(self.value), n)]),
                mx.concatenate([mx.zeros_like(value_bias), value_bias]),
            ),
            "out": linear_layer(mx.contiguous(pad_heads(dense_weight(self.out).T, n).T), self.out.bias),
        }
        mx.eval(self._padded)

    def padded_heads(self, y: mx.array) -> mx.array:
        """A padded projection's output (batch, n, groups * heads * padded head) as (batch, groups,
        heads, n, padded head)."""
        batch, n, width = y.shape
        head = self.head_dim + HEAD_PAD
        groups = width // (self.n_head * head)
        if n == 1:  # the same memory order: no transposed copy for a step's single token
            return y.reshape(batch, groups, self.n_head, 1, head)
        return y.reshape(batch, n, groups, self.n_head, head).transpose(0, 2, 3, 1, 4)

    def merge_heads(self, t: mx.array) -> mx.array:
        batch, n_head, n, head_dim = t.shape
        if n == 1:
            return t.reshape(batch, 1, n_head * head_dim)
        return t.transpose(0, 2, 1, 3).reshape(batch, n, n_head * head_dim)

    def attend(
        self,
        x: mx.array,
        k: mx.array,
        v: mx.array,
        mask: mx.array | None,
        *,
        norm: nn.LayerNorm | None = None,
        residual: mx.array | None = None,
    ) -> mx.array:
        """Attention of x's queries over k, v; `norm` and `residual` as in `linear`."""
        q = linear(self.query, x, norm=norm)
        return linear(self.out, kernels.multi_head_attention(q, k, v, self.n_head, mask), residual=residual)

    def attend_padded(
        self, x: mx.array, norm: nn.LayerNorm, cache: tuple[mx.array, mx.array], offset: mx.array, mask: mx.array | None
    ) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        """x plus the self-attention of norm(x) at positions `offset` onwards over a padded-heads
        cache (see HEAD_PAD), x's keys and values written into it there; and the updated cache."""
        q = self.padded_heads(linear(self._padded["query"], x, norm=norm)).squeeze(1)
        key_value = self.padded_heads(linear(self._padded["key_value"], x, norm=norm))
        k = mx.slice_update(cache[0], key_value[:, 0], offset, axes=(2,))
        v = mx.slice_update(cache[1], key_value[:, 1], offset, axes=(2,))
        attended = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        return linear(self._padded["out"], self.merge_heads(attended), residual=x), (k, v)

    def attention_logits(self, x: mx.array, k: mx.array) -> mx.array:
        """Scaled query-key products before the softmax, (batch, heads, queries, keys)."""
        q = self._heads(linear(self.query, x))
        head_dim = q.shape[-1]
        return (q * head_dim**-0.5) @ self._heads(k).transpose(0, 1, 3, 2)

    def _heads(self, t: mx.array) -> mx.array:
        batch, length, n_state = t.shape
        return t.reshape(batch, length, self.n_head, n_state // self.n_head).transpose(0, 2, 1, 3)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = LayerNorm(n_state) if cross_attention else None
        self.mlp1 = nn.Linear(n_state, 4 * n_state)
        self.mlp2 = nn.Linear(4 * n_state, n_state)
        self.mlp_ln = LayerNorm(n_state)

    def __call__(
        self,
        x: mx.array,
        mask: mx.array | None = None,
        cache: tuple[mx.array, mx.array] | None = None,
        cross: CrossSource | None = None,
        cross_logits: list[mx.array] | None = None,
        offset: mx.array | None = None,
    ) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        """One block; appends its cross-attention logits to `cross_logits` when given.

        With a `cache`, this block's keys and values are written into it at position `offset`
        and attention runs over the whole cache (`mask`, given several tokens, hides the positions
        after each).
        """
        if cache is not None and cross is not None and cross_logits is None and x.shape[1] == 1:
            over_features = isinstance(cross, dict)
            stepped = kernels.decoder_layer_step(
                x,
                offset,
                cache,
                (cross["frame_panels"], cross["channel_panels"]) if over_features else cross,
                self.step_weights(over_features=over_features),
                self.attn.n_head,
                self.attn_ln.eps,
                over_features=over_features,
            )
            if stepped is not None:
                return stepped
        if cache is None:
            h = self.attn_ln(x)
            k, v = self.attn.project_kv(h)
            x = self.attn.attend(h, k, v, mask, residual=x)
        elif cache[0].ndim == 4:
            x, (k, v) = self.attn.attend_padded(x, self.attn_ln, cache, offset, mask)
        else:
            attended, (k, v) = self.attn.attend_cache(self.attn_ln(x), cache, offset)
            x = x + attended
        # Each projection below takes its layer norm, GELU or residual add along (`linear`).
        if self.cross_attn is not None:
            keys, values = self.cross_attn.project_kv(cross["features"]) if isinstance(cross, dict) else cross
            if cross_logits is not None:
                cross_logits.append(self.cross_attn.attention_logits(self.cross_attn_ln(x), keys))
            x = self.cross_attn.attend(x, keys, values, None, norm=self.cross_attn_ln, residual=x)
        x = linear(self.mlp2, linear(self.mlp1, x, norm=self.mlp_ln, gelu=True), residual=x)
        return x, (k, v)

    def products(self) -> list[nn.Linear]:
        """The layers whose matrices multiply the whole sequence (for the encoder's blocks)."""
        attn = self.attn
        return [attn.query, attn.key, attn.value, attn.out, self.mlp1, self.mlp2]

    def step_weights(self, *, over_features: bool = False) -> list[mx.array]:
        """The weights in the order `kernels.decoder_layer_step` takes them."""
        attn, cross = self.attn, self.cross_attn
        weights = [
            *(self.attn_ln.weight, self.attn_ln.bias, attn.query.weight, attn.query.bias, attn.key.weight),
            *(attn.value.weight, attn.value.bias, attn.out.weight, attn.out.bias),
            *(self.cross_attn_ln.weight, self.cross_attn_ln.bias, cross.query.weight, cross.query.bias),
            *(cross.out.weight, cross.out.bias, self.mlp_ln.weight, self.mlp_ln.bias),
            *(self.mlp1.weight, self.mlp1.bias, self.mlp2.weight, self.mlp2.bias),
        ]
        if over_features:
            weights += [cross.key.weight, cross.value.weight, cross.value.bias]
        return weights


class AudioEncoder(nn.Module):
    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self._positional_embedding = mx.array(sinusoids(n_ctx, n_state))
        self.blocks = [ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer)]
        self.ln_post = LayerNorm(n_state)

    def __call__(self, mel: mx.array, *, partial: bool = False) -> mx.array:
        """Features of a 30-second window; with `partial`, of its first frames only (an even number)."""
        if kernels.runs_avx512():  # the panel product widens float16 weights itself
            store_in_half([layer for block in self.blocks for layer in block.products()])
        x = convolve_gelu(self.conv2, convolve_gelu(self.conv1, mel))
        n_ctx = self._positional_embedding.shape[0]
        if x.shape[1] > n_ctx or (x.shape[1] < n_ctx and not partial):
            raise ValueError(f"the encoder takes 30-second windows (3000 frames); got {mel.shape[1]} frames")
        # The positions are not a parameter, so they stay float32: cast, or fp16 weights compute in fp32.
        x = x + self._positional_embedding[: x.shape[1]].astype(x.dtype)
        for block in self.blocks:
            x, _ = block(x)
        return self.ln_post(x)


class TextDecoder(nn.Module):
    def __init__(self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        self.positional_embedding = mx.zeros((n_ctx, n_state))
        self.blocks = [ResidualAttentionBlock(n_state, n_head, cross_attention=True) for _ in range(n_layer)]
        self.ln = LayerNorm(n_state)
        # One new token per sequence, traced once per batch size (the cache has a fixed size).
        # The weights are inputs, not constants of the trace: loading or converting them later counts.
        self.step = mx.compile(self._step, inputs=self)
        self.step_then = functools.cache(self._compile_step_then)

    def store_weights_in_half(self) -> None:
        """Keep the token embedding and the layers' matrices in float16 where that changes no
        value: the bundled checkpoints are float16, so their float32 weights hold float16 values,
        and the CPU kernels then read half the bytes of a decoding step for the same products
        (the same logits, bit for bit).  Anywhere else (no kernels, other values) they stay."""
        if not kernels.available():
            return
        layers = [self.token_embedding]
        for block in self.blocks:
            attentions = [block.attn, block.cross_attn]
            layers += [
                block.mlp1,
                block.mlp2,
                *(getattr(a, n) for a in attentions for n in ("query", "key", "value", "out")),
            ]
        halved = store_in_half(layers)
        if any(layer is self.token_embedding for layer in halved):  # the largest read of a step, 40-53 MB
            kernels.prefer_huge_pages(self.token_embedding.weight)
        halved = [layer for layer in halved if layer is not self.token_embedding]
        if halved:
            # The layers' matrices as views of one buffer backed by 2 MB pages: most are smaller
            # than a page themselves.  (The step's kernel reads views in place.)
            packed = mx.concatenate([layer.weight.reshape(-1) for layer in halved])
            kernels.prefer_huge_pages(packed)
            start = 0
            for layer in halved:
                layer.weight = packed[start : start + layer.weight.size].reshape(layer.weight.shape)
                start += layer.weight.size
            mx.eval([layer.weight for layer in halved])
            # The float32 matrices and the separate halves would stay in MLX's buffer cache.
            mx.clear_cache()

    def _embed(self, tokens: mx.array) -> mx.array:
        return self.token_embedding(tokens).astype(self.positional_embedding.dtype)

    def cross_kv(self, audio_features: mx.array) -> list[tuple[mx.array, mx.array]]:
        """Keys and values of the audio, computed once per window and reused every step."""
        return [block.cross_attn.project_kv(audio_features) for block in self.blocks]

    def audio_memory(self, audio_features: mx.array) -> AudioMemory:
        """What decoding over these features reads of them (see CrossSource): where the CPU steps
        attend over the features themselves, the features and their panels (`kernels.pack_features`);
        else `cross_kv`."""
        if not kernels.steps_over_features(audio_features, self.blocks[0].attn.n_head):
            return self.cross_kv(audio_features)
        frame_panels, channel_panels = kernels.pack_features(audio_features)
        mx.eval(frame_panels, channel_panels)
        return {"features": audio_features, "frame_panels": frame_panels, "channel_panels": channel_panels}

    def new_cache(self, batch: int) -> KVCache:
        """An empty cache, in the CPU kernels' layout where they attend, else as padded heads."""
        n_ctx, n_state = self.positional_embedding.shape
        dtype = self.ln.weight.dtype  # never quantized, unlike the embedding
        attention = self.blocks[0].attn
        if kernels.attends_cache(attention.head_dim):
            shape = (batch, n_ctx, n_state)
            return [(mx.zeros(shape, dtype), mx.zeros(shape, dtype)) for _ in self.blocks]
        for block in self.blocks:
            block.attn.pad_weights()
        shape = (batch, attention.n_head, n_ctx, attention.head_dim + HEAD_PAD)
        keys = mx.zeros(shape, dtype)
        keys[..., attention.head_dim] = UNWRITTEN_KEY
        return [(keys, mx.zeros(shape, dtype)) for _ in self.blocks]

    def forget(self, cache: KVCache, n_kept: int) -> KVCache:
        """The cache with positions from `n_kept` on counting as unwritten again."""
        if cache[0][0].ndim == 3:  # the CPU kernels never read past the query's position
            return cache
        for keys, _ in cache:
            keys[:, :, n_kept:, self.blocks[0].attn.head_dim] = UNWRITTEN_KEY
        return cache

    def __call__(
        self,
        tokens: mx.array,
        audio: AudioMemory,
        cache: KVCache | None = None,
        cross_logits: list[mx.array] | None = None,
        *,
        offset: mx.array | None = None,
        positions: int | None = None,
    ) -> tuple[mx.array, KVCache]:
        """Logits of the last `positions` positions (default all), and the updated cache.  `audio`
        is `cross_kv` or `audio_memory` of the audio features.

        Without a cache the tokens attend to each other only and the returned cache holds
        their keys and values. With one (`new_cache`), the tokens sit at positions `offset`
        (an int32 array of one element) onwards, after those already cached.
        With `cross_logits` given, each layer's cross-attention logits are appended to it.
        """
        n = tokens.shape[-1]
        mask = None
        if cache is None:
            x = self._embed(tokens) + self.positional_embedding[:n]
            if n > 1:
                mask = nn.MultiHeadAttention.create_additive_causal_mask(n).astype(x.dtype)
            cache = [None] * len(self.blocks)
        else:
            at = offset + mx.arange(n)
            x = self._embed(tokens) + self.positional_embedding[at]
            if n > 1:
                after = mx.arange(self.positional_embedding.shape[0])[None] > at[:, None]
                mask = mx.where(after, -mx.inf, 0.0).astype(x.dtype)
        new_cache: KVCache = []
        sources = audio if isinstance(audio, list) else [audio] * len(self.blocks)
        for block, layer_cache, cross in zip(self.blocks, cache, sources):
            x, layer_cache = block(x, mask, layer_cache, cross, cross_logits, offset)
            new_cache.append(layer_cache)
        if positions is not None:
            x = x[:, -positions:]
        if isinstance(self.token_embedding, nn.QuantizedEmbedding):
            return self.token_embedding.as_linear(self.ln(x)), new_cache
        return linear(self.token_embedding, x, norm=self.ln), new_cache

    def _step(
        self,
        tokens: mx.array,
        audio: AudioMemory,
        cache: KVCache,
        offset: mx.array,
    ) -> tuple[mx.array, KVCache]:
        logits, cache = self(tokens, audio, cache, offset=offset, positions=1)
        return logits[:, 0], cache

    def _compile_step_then(self, then: Callable) -> Callable:
        """`step` followed by `then(logits, *extra)`, compiled together (one per `then`):
        (tokens, audio, cache, offset, *extra) -> (then's result, cache)."""

        def fused(tokens: mx.array, audio: AudioMemory, cache: KVCache, offset: mx.array, *extra: mx.array):
            logits, cache = self._step(tokens, audio, cache, offset)
            return then(logits, *extra), cache

        return mx.compile(fused, inputs=self)


class Whisper(nn.Module):
    def __init__(self, dims: ModelDimensions, alignment_heads: list[list[int]] | None = None):
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(
            dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer
        )
        self.decoder = TextDecoder(
            dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head, dims.n_text_layer
        )
        # By default the last half of the decoder layers align words with audio.
        self.alignment_heads = alignment_heads or [
            [layer, head]
            for layer in range(dims.n_text_layer // 2, dims.n_text_layer)
            for head in range(dims.n_text_head)
        ]

    @property
    def is_multilingual(self) -> bool:
        return self.dims.n_vocab >= 51865

    @property
    def num_languages(self) -> int:
        return self.dims.n_vocab - 51765 - int(self.is_multilingual)

    @property
    def dtype(self) -> mx.Dtype:
        return self.encoder.conv1.weight.dtype  # never quantized

    def embed_audio(self, mel: mx.array, *, partial: bool = False) -> mx.array:
        return self.encoder(mel.astype(self.dtype), partial=partial)

    def logits(self, tokens: mx.array, audio_features: mx.array) -> mx.array:
        logits, _ = self.decoder(tokens, self.decoder.cross_kv(audio_features))
        return logits
