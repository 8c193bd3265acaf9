"""The compiled CPU kernels' backend (`whisper.kernels`): float32 activations, weights kept in
float16 where that changes no value, and a decoding step as one kernel call per layer.

What it does differently from the plain model, and why (bench/NOTES.md has the measurements):

- Weights: the bundled checkpoints are float16, so their float32 matrices hold float16 values; the
  kernels widen float16 exactly, so the same products read half the bytes.  The decoder's
  matrices share one buffer backed by 2 MB pages (a step reads each weight once, and 4 KB pages
  cost a TLB miss each).
- The encoder: products and convolutions over panels of the weights (AVX-512), attention, GELU
  and layer norms as kernels on every core.  With 8-bit weights (`load_model(..., quantize=8)`,
  which quantizes the encoder's linear layers alone here: `quantize`) its products take 8-bit
  activations too (`kernels.quantized_product`).
- The self-attention cache is (rows, n_ctx, state) per layer, which the kernels read in place.
  It counts the positions alike in every row of a window (its first pass's, before the window's
  beams parted): a step reads those once for all the window's rows, and a reorder copies none.
  A beam's reorder waits in the cache for the next step's kernels, which copy the rows first.
- A step's cross-attention reads the audio features themselves where AVX-512 runs (`kernels.
  steps_over_features`): they stay in the cache where each layer's keys and values came from
  memory at every step.  A pass over many tokens computes those keys and values when it runs.
"""

from __future__ import annotations

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

from .. import kernels
from ..model import ResidualAttentionBlock, Whisper
from . import QUANTIZATION_GROUP, AudioMemory, Backend, Cache
from .fused import FusedBackend

# Over the audio features, up to this many new tokens go through one step each: a pass over them
# all would first compute every layer's keys and values of the audio (eight of base's steps).
STEPPED_TOKENS = 8
# Over the features each of a window's rows costs a pass over them per head (a head's query
# folded to the whole state), where its keys and values are read once for all its rows: past
# this many rows and heads a window, keys and values cost the step less (five of base's beams).
FEATURE_QUERIES_PER_WINDOW = 32


def kernels_load() -> bool:
    """Whether the compiled kernels run here: built for this MLX, on a CPU they support."""
    return kernels.available()


def half_if_exact(weight: mx.array) -> mx.array:
    """A float32 weight as float16 if that changes no value, else the weight as it is."""
    if weight.dtype != mx.float32:
        return weight
    half = weight.astype(mx.float16)
    mx.eval(half)
    # Compared in slices: a whole float32 copy of the embedding would add to the peak memory.
    rows = range(0, weight.shape[0], 4096)
    exact = all(mx.array_equal(half[i : i + 4096].astype(mx.float32), weight[i : i + 4096]).item() for i in rows)
    return half if exact else weight


def store_in_half(layers: list[nn.Module]) -> list[nn.Module]:
    """Each layer's float32 matrix replaced by its float16 copy where that changes no value; the
    layers whose matrix was replaced."""
    halved = []
    for layer in layers:
        if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)) or layer.weight.dtype != mx.float32:
            continue
        half = half_if_exact(layer.weight)
        if half is not layer.weight:
            layer.weight = half
            halved.append(layer)
    return halved


def convolve_gelu(conv: nn.Conv1d, x: mx.array) -> mx.array:
    """GELU(conv(x)) for x (batch, frames, channels).  Where the panel product takes the layer's
    matrix (out, width * in): one product over the `width` shifted (strided) copies of x side by
    side, the columns that matrix multiplies."""
    matrix = conv.weight.reshape(conv.weight.shape[0], -1)
    if x.dtype != mx.float32 or conv.dilation != 1 or conv.groups != 1 or not kernels.multiplies_in_panels(matrix):
        return kernels.gelu(conv(x))
    width, pad, stride = conv.weight.shape[1], conv.padding, conv.stride
    padded = mx.pad(x, [(0, 0), (pad, pad), (0, 0)])
    last = padded.shape[1] - width  # the last window's first frame
    shifted = [padded[:, k : k + last + 1 : stride] for k in range(width)]
    return kernels.panel_product(mx.concatenate(shifted, axis=-1), matrix, conv.get("bias"), gelu=True)


def products(block: ResidualAttentionBlock) -> list[nn.Linear]:
    attentions = [a for a in (block.attn, block.cross_attn) if a is not None]
    return [*(getattr(a, n) for a in attentions for n in ("query", "key", "value", "out")), block.mlp1, block.mlp2]


def step_weights(block: ResidualAttentionBlock) -> dict[str, mx.array]:
    """A decoder layer's weights as `kernels.decoder_layer_step` takes them: by parameter path."""
    return dict(tree_flatten(block.parameters()))


class CpuBackend(FusedBackend):
    name = "cpu-kernels"

    def __init__(self, model: Whisper):
        super().__init__(model)
        self._store_weights_in_half()

    @staticmethod
    def quantize(model: Whisper, bits: int) -> None:
        """8 bits: the encoder's linear layers, which `kernels.quantized_product` multiplies by
        8-bit activations, and nothing else: the decoder keeps its float weights, which a step
        reads faster than MLX's quantized products on a CPU (bench/NOTES.md).  Other bits: as the
        plain model, every layer."""
        if bits == 8:
            nn.quantize(model.encoder, group_size=QUANTIZATION_GROUP, bits=bits)
        else:
            Backend.quantize(model, bits)

    def _store_weights_in_half(self) -> None:
        encoder, decoder = self.model.encoder, self.model.decoder
        if kernels.runs_avx512():  # the panel product widens float16 weights itself
            store_in_half([layer for block in encoder.blocks for layer in products(block)])
        halved = store_in_half([layer for block in decoder.blocks for layer in products(block)])
        if store_in_half([decoder.token_embedding]):  # the largest read of a step
            kernels.prefer_huge_pages(decoder.token_embedding.weight)
        if halved:
            # The matrices as views of one buffer of 2 MB pages: most are smaller than a page.
            packed = mx.concatenate([layer.weight.reshape(-1) for layer in halved])
            kernels.prefer_huge_pages(packed)
            start = 0
            for layer in halved:
                layer.weight = packed[start : start + layer.weight.size].reshape(layer.weight.shape)
                start += layer.weight.size
        mx.eval(self.model.parameters())
        mx.clear_cache()  # the float32 matrices and the separate halves

    # ------------------------------------------------------------------ operations

    def linear(self, layer, x, *, norm=None, residual=None, gelu=False):
        if norm is not None:
            x = self.layer_norm(x, norm)
        many_rows = x.dtype == mx.float32 and not kernels.few_rows(x)
        if many_rows and kernels.multiplies_quantized(layer):
            weights = (layer.weight, layer.scales, layer.biases, layer.get("bias"))
            return kernels.quantized_product(x, *weights, gelu=gelu, residual=residual)
        if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            y = layer.as_linear(x) if isinstance(layer, nn.QuantizedEmbedding) else layer(x)
        elif many_rows and kernels.multiplies_in_panels(layer.weight):
            return kernels.panel_product(x, layer.weight, layer.get("bias"), gelu=gelu, residual=residual)
        else:
            y = kernels.linear(x, layer.weight, layer.get("bias"))
        if gelu:
            y = kernels.gelu(y)
        return y if residual is None else residual + y

    def layer_norm(self, x: mx.array, norm: nn.LayerNorm) -> mx.array:
        return kernels.layer_norm(x, norm.weight, norm.bias, norm.eps)

    def attention(self, q: mx.array, k: mx.array, v: mx.array, n_head: int) -> mx.array:
        return kernels.multi_head_attention(q, k, v, n_head)

    convolve_gelu = staticmethod(convolve_gelu)

    # --------------------------------------------------------------------- decoder

    def audio_memory(self, features: mx.array, group: int = 1) -> AudioMemory:
        """Over the features where steps run over them: the features and their panels; else each
        layer's keys and values.  One per window: its rows (beams, samples) share them."""
        # More rows than the step kernel takes go through the layers' ops, which read keys and values.
        n_head = self.model.decoder.blocks[0].attn.n_head
        over_features = group * n_head <= FEATURE_QUERIES_PER_WINDOW and kernels.steps_over_features(features, n_head)
        if features.shape[0] * group > kernels.MATVEC_ROWS or not over_features:
            memory = {"keys_values": super().audio_memory(features)}
        else:
            memory = {"features": features, "panels": kernels.pack_features(features)}
        mx.eval(memory)
        return memory

    def cross_keys_values(self, audio: AudioMemory, layer: int) -> tuple[mx.array, mx.array]:
        if "features" in audio:
            attention = self.model.decoder.blocks[layer].cross_attn
            return self.linear(attention.key, audio["features"]), self.linear(attention.value, audio["features"])
        return audio["keys_values"][layer]

    def new_cache(self, rows: int) -> Cache:
        """Each layer's keys and values, (rows, n_ctx, state); how many positions are alike in
        every row of a window (int32, (1,)); each row's source, for a reorder not yet carried out
        (int32, (rows,)).  Arrays, not ints, so that steps trace once."""
        n_ctx, n_state = self.model.decoder.positional_embedding.shape
        dtype = self.model.decoder.ln.weight.dtype
        layers = [
            (mx.zeros((rows, n_ctx, n_state), dtype), mx.zeros((rows, n_ctx, n_state), dtype))
            for _ in self.model.decoder.blocks
        ]
        return {"layers": layers, "alike": mx.array([0], dtype=mx.int32), "sources": mx.arange(rows, dtype=mx.int32)}

    def _reordered(self, cache: Cache, layer_cache: tuple[mx.array, mx.array], offset: mx.array) -> tuple:
        """A layer's caches with the waiting reorder carried out by its own kernel calls."""
        return tuple(kernels.reorder_rows(t, cache["sources"], offset, cache["alike"]) for t in layer_cache)

    def forget(self, cache: Cache, n_kept: int) -> Cache:
        # The kernels never read past the query's position: only the alike positions may shrink.
        return {**cache, "alike": mx.minimum(cache["alike"], n_kept)}

    def self_attend(self, block, x, cache, offset):
        attn = block.attn
        h = self.layer_norm(x, block.attn_ln)
        k = mx.slice_update(cache[0], self.linear(attn.key, h), offset, axes=(1,))
        v = mx.slice_update(cache[1], self.linear(attn.value, h), offset, axes=(1,))
        attended = kernels.cached_attention(self.linear(attn.query, h), k, v, offset, attn.n_head)
        return self.linear(attn.out, attended, residual=x), (k, v)

    def forward(self, tokens, audio, cache, offset, positions=None):
        n = tokens.shape[1]
        if "features" in audio and n <= STEPPED_TOKENS:
            logits = []
            for i in range(n):
                step_logits, cache = self.step(tokens[:, i : i + 1], audio, cache, mx.array([offset + i], mx.int32))
                logits.append(step_logits)
            return mx.stack(logits[n - (positions or n) :], axis=1), cache
        position = mx.array([offset], mx.int32) if isinstance(offset, int) else offset
        layers = [self._reordered(cache, layer, position) for layer in cache["layers"]]
        logits, layers = super().forward(tokens, audio, layers, offset, positions)
        return logits, {**cache, "layers": layers, "sources": mx.arange(tokens.shape[0], dtype=mx.int32)}

    def _step(self, tokens, audio, cache, offset):
        """One kernel call per layer where the step kernel takes the rows; else the layer's ops."""
        decoder = self.model.decoder
        x = decoder.embed(tokens, offset)
        over_features = "features" in audio
        n_audio = (audio["features"] if over_features else audio["keys_values"][0][0]).shape[0]
        # The position, the positions alike in a window's rows, each row's source.
        header = mx.concatenate([offset, cache["alike"], cache["sources"]])
        new_cache = []
        for layer, (block, layer_cache) in enumerate(zip(decoder.blocks, cache["layers"])):
            source = audio["panels"] if over_features else audio["keys_values"][layer]
            stepped = kernels.decoder_layer_step(
                x,
                header,
                layer_cache,
                source,
                step_weights(block),
                block.attn.n_head,
                block.attn_ln.eps,
                over_features=over_features,
                group=x.shape[0] // n_audio,
            )
            if stepped is None:
                x, layer_cache = self.self_attend(block, x, self._reordered(cache, layer_cache, offset), offset)
                x = self.mlp(block, self.cross_attend(block, x, *self.cross_keys_values(audio, layer)))
            else:
                x, layer_cache = stepped
            new_cache.append(layer_cache)
        identity = mx.arange(x.shape[0], dtype=mx.int32)
        return self.unembed(x)[:, 0], {**cache, "layers": new_cache, "sources": identity}

    def reorder(self, cache: Cache, sources: list[int], n_cached: int) -> Cache:
        """Rows parting (row i from row i // group): their positions so far are alike.  Rows as
        many: the next step's kernels copy, in place, only rows whose source differs and only their
        positions past the alike ones; each source is a row of its own window (as a beam's is)."""
        rows = cache["layers"][0][0].shape[0]
        index = cache["sources"][mx.array(sources, dtype=mx.int32)]  # after any reorder still waiting
        if len(sources) != rows:
            group = len(sources) // rows
            parted = sources == [row // group for row in range(len(sources))]
            layers = [tuple(t[index] for t in layer) for layer in cache["layers"]]
            alike = mx.array([n_cached if parted else 0], dtype=mx.int32)
            return {"layers": layers, "alike": alike, "sources": mx.arange(len(sources), dtype=mx.int32)}
        return {**cache, "sources": index}

    def greedy_choice(self, logits, forbidden, ranges, timestamp_begin):
        return kernels.greedy_choice(logits, forbidden, ranges, timestamp_begin)

    def top_choices(self, logits, forbidden, ranges, timestamp_begin, k):
        return kernels.top_choices(logits, forbidden, ranges, timestamp_begin, k)
