"""Fast CPU kernels for the engine's hot spots, with MLX's own ops as the fallback.

On a Linux CPU the mlx[cpu] wheel computes exp and erf one lane at a time on one thread, so
softmax and GELU, not the matrix products, dominated the encoder.  The C++ sources here implement
both, a fused attention (also causal over the decoder's key cache), a matrix-vector product
(a decoding step's projections), a decoder layer's whole one-token step, a product of float rows
and 8-bit weights (the encoder's under `load_model(..., quantize=8)`) and, on CPUs with AVX-512,
a matrix product over panels of the weights (the encoder's) and a step's attention over the
audio features, as MLX primitives (AVX2+FMA, split across cores), compiled by
`python -m whisper.kernels.build` (scripts/setup.sh runs it).  Where the library is missing, was
built for another mlx, the CPU lacks AVX2 or the default device is a GPU, these functions use
MLX's ops.  MENNY_NO_KERNELS=1 forces MLX's ops; MENNY_KERNELS_AVX2_ONLY=1 the AVX2 kernels alone
(what a CPU without AVX-512 runs), read when the library loads.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import mlx.core as mx
from mlx import nn

log = logging.getLogger("whisper")

SOURCE_DIR = Path(__file__).resolve().parent
SOURCE_PATTERNS = ("*.cpp", "*.h", "CMakeLists.txt")
BUILD_DIR = SOURCE_DIR / "_build"
STAMP = BUILD_DIR / "stamp.json"
MODULE_NAME = "_fast_ops"
LIBRARY = BUILD_DIR / f"{MODULE_NAME}{sysconfig.get_config_var('EXT_SUFFIX')}"
NO_AVX2 = "this CPU lacks AVX2, FMA or F16C"


def sources_sha256() -> str:
    """The hash of the kernels' sources, as the build's stamp records it."""
    digest = hashlib.sha256()
    for path in sorted(p for pattern in SOURCE_PATTERNS for p in SOURCE_DIR.glob(pattern)):
        # The name too: a file renamed or moved between two others changes what is built.
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@functools.cache
def load() -> tuple[ModuleType | None, str]:
    """The compiled module and a note on it, or None and why it is unavailable."""
    if os.environ.get("MENNY_NO_KERNELS") == "1":
        return None, "MENNY_NO_KERNELS=1"
    if not LIBRARY.exists() or not STAMP.exists():
        return None, "not built (run: python -m whisper.kernels.build)"
    # A library built against another mlx may not even load safely: check before importing.
    stamp = json.loads(STAMP.read_text())
    built_for = stamp.get("mlx_version")
    if built_for != mx.__version__:
        return None, f"built for mlx {built_for}, this is mlx {mx.__version__} (run: python -m whisper.kernels.build)"
    # One built from older sources lacks the newer kernels the engine calls.
    if stamp.get("sources_sha256") != sources_sha256():
        return None, "built from other sources than these (run: python -m whisper.kernels.build)"
    spec = importlib.util.spec_from_file_location(f"{__name__}.{MODULE_NAME}", LIBRARY)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as error:
        return None, f"the built library does not load ({error}); rebuild it"
    if not module.uses_avx2():
        return None, NO_AVX2
    try:
        # mx.array must cross into the library: a nanobind mismatch shows up here as a TypeError.
        with mx.stream(mx.cpu):
            mx.eval(module.softmax(mx.zeros((1, 2), dtype=mx.float32)))
    except (TypeError, ValueError, RuntimeError) as error:
        return None, f"the built library does not work with this mlx ({error}); rebuild it"
    return module, f"{module.threads()} threads"


@functools.cache
def compiled() -> ModuleType | None:
    """The compiled kernels if they load here; logs once which implementation is used."""
    module, detail = load()
    if module is None:
        log.debug("softmax, GELU, attention: MLX's ops (compiled kernels unavailable: %s)", detail)
    else:
        log.debug("softmax, GELU, attention: compiled CPU kernels (%s)", detail)
    return module


_forced_fallback = False


@contextlib.contextmanager
def fallback() -> Iterator[None]:
    """Use MLX's own ops inside the block, so one process can compare both (not thread-safe)."""
    global _forced_fallback
    previous, _forced_fallback = _forced_fallback, True
    try:
        yield
    finally:
        _forced_fallback = previous


def _on_cpu() -> ModuleType | None:
    if _forced_fallback or mx.default_device() != mx.cpu:
        return None
    return compiled()


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis, computed in float32 (`mx.softmax(x, axis=-1, precise=True)`)."""
    module = _on_cpu()
    return module.softmax(x) if module else mx.softmax(x, axis=-1, precise=True)


def gelu(x: mx.array) -> mx.array:
    """Exact GELU, x * Phi(x) (`mlx.nn.gelu`)."""
    module = _on_cpu()
    return module.gelu(x) if module else nn.gelu(x)


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    """`mx.fast.layer_norm` over the last axis; on a CPU the same bits, computed on every core."""
    module = _on_cpu()
    if module is not None and x.dtype == mx.float32:
        return module.layer_norm(x, weight, bias, eps)
    return mx.fast.layer_norm(x, weight, bias, eps)


def prefer_huge_pages(a: mx.array) -> None:
    """Evaluate `a` and have its memory backed by 2 MB pages where whole ones fit, on Linux: a
    decoding step reads each weight once, and with 4 KB pages (a TLB miss each, and the hardware
    prefetcher stopping at each) the vocabulary's matvec reads slower (bench/NOTES.md)."""
    module = _on_cpu()
    if module is not None:
        module.huge_pages(a)


# Up to this many rows of x, `linear` reads the weights once per row block instead of packing them.
MATVEC_ROWS = 8


def available() -> bool:
    """Whether these functions use the compiled kernels here and now."""
    return _on_cpu() is not None


def few_rows(x: mx.array) -> bool:
    """Whether x (..., depth) has at most MATVEC_ROWS rows (a decoding step's), which `linear`
    multiplies in one pass over the weights."""
    return x.size <= MATVEC_ROWS * x.shape[-1]


def linear(x: mx.array, w: mx.array, bias: mx.array | None = None) -> mx.array:
    """x (..., depth) @ w.T (+ bias) for w (n, depth), as `mlx.nn.Linear`, in x's dtype; for a
    few rows of x (a decoding step) one pass over w, which may be float16 (half the bytes)."""
    module = _on_cpu()
    if module is not None and few_rows(x):
        return module.matvec(x, w, bias)
    w = w.astype(x.dtype)
    return x @ w.T if bias is None else mx.addmm(bias, x, w.T)


PANEL_WIDTH = 32  # the panel product's output columns per panel


def runs_avx512() -> bool:
    """Whether the AVX-512 kernels (`panel_product`, steps over the audio features) run here and
    now: the compiled kernels on a CPU with AVX-512."""
    module = _on_cpu()
    return module is not None and module.uses_avx512()


def multiplies_in_panels(w: mx.array) -> bool:
    """Whether `panel_product` takes the matrix w here and now."""
    return runs_avx512() and w.ndim == 2 and w.dtype in (mx.float16, mx.float32) and w.shape[0] % PANEL_WIDTH == 0


def panel_product(
    x: mx.array, w: mx.array, bias: mx.array | None = None, *, gelu: bool = False, residual: mx.array | None = None
) -> mx.array:
    """x (..., depth) float32 @ w.T (+ bias), exact GELU if asked, + residual if given, for w (n,
    depth) float32 or float16 where `multiplies_in_panels(w)`: w is packed 32 rows at a time,
    in the cache, and the bias, GELU and residual are applied while the result is there too (the
    same bits as those ops after)."""
    return _on_cpu().panel_product(x, w, bias, residual, gelu)


QUANTIZED_STRIP_WIDTH = 64  # the quantized product's output columns per strip of packed weights


def multiplies_quantized(layer: nn.Module) -> bool:
    """Whether `quantized_product` takes this layer's weights here and now: an `nn.QuantizedLinear`
    of MLX's affine format, 8 bits in groups of 64, a multiple of 64 outputs."""
    return (
        available()
        and isinstance(layer, nn.QuantizedLinear)
        and (layer.mode, layer.bits, layer.group_size) == ("affine", 8, 64)
        and layer.weight.shape[0] % QUANTIZED_STRIP_WIDTH == 0
    )


def quantized_product(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    bias: mx.array | None = None,
    *,
    gelu: bool = False,
    residual: mx.array | None = None,
) -> mx.array:
    """x (..., depth) float32 @ W.T (+ bias), exact GELU if asked, + residual if given, for 8-bit
    weights W (n, depth) as `mx.quantize(W, group_size=64, bits=8)` gives them (w, scales,
    biases: an `nn.QuantizedLinear`'s, where `multiplies_quantized`).  Each row of x is quantized
    to int8 first (symmetric: x ~ s p, s = max |x| / 127, p = x / s rounded to nearest), and the
    result is s p times W's values, each group of 64 inputs summed exactly as integers.  So it
    differs from MLX's product of float x and the same weights by x's rounding alone: at most
    s / 2 times the sum of an output's weights' magnitudes.  AVX-512 VNNI or AVX2, the same bits."""
    return _on_cpu().quantized_product(x, w, scales, biases, bias, residual, gelu)


def decoder_layer_step(
    x: mx.array,
    offset: mx.array,
    cache: tuple[mx.array, mx.array],
    audio: tuple[mx.array, mx.array],
    weights: dict[str, mx.array],
    n_head: int,
    eps: float,
    *,
    over_features: bool = False,
    group: int = 1,
) -> tuple[mx.array, tuple[mx.array, mx.array]] | None:
    """One token's step through a decoder layer as one kernel call: its output and the caches
    with the token's key and value written at `offset`, in place.  x (rows, 1, state) and the
    caches (rows, n_ctx, state) have `group` rows per audio (beams or samples of one audio),
    rows = n_audio * group, and row r attends over audio r // group.  `offset` (int32) is the
    position, and may go on with how many positions are alike in the caches of an audio's rows
    (read once, from its first row, for all of them), then with each row's source (a beam
    search's reorder, carried out in the caches first).  `weights` are the block's
    parameters by name, `dict(tree_flatten(block.parameters()))` ("attn_ln.weight",
    "attn.query.bias", "mlp1.weight", ...).  `audio` is the audios' keys and values (n_audio,
    frames, state) each, or with `over_features` the audio features packed by `pack_features`
    (the cross-attention's key and value weights then come from `weights` too).  None where the
    kernel cannot run it (no kernels here, other dtypes, quantized weights, more rows than a
    matvec takes): the layer's own ops then run."""
    module = _on_cpu()
    if module is None:
        return None
    plain = all(w.dtype == mx.float32 or (w.ndim == 2 and w.dtype == mx.float16) for w in weights.values())
    floats = all(a.dtype == mx.float32 for a in (x, *cache, *audio))
    if not plain or not floats or x.shape[0] > MATVEC_ROWS or (x.shape[-1] // n_head) % 16:
        return None
    if over_features and not module.uses_avx512():
        return None
    out, keys, values = module.decoder_layer(x, offset, *cache, *audio, weights, n_head, eps, over_features, group)
    return out, (keys, values)


def _one_int32(value: int | mx.array) -> mx.array:
    return (value if isinstance(value, mx.array) else mx.array(value)).astype(mx.int32).reshape(1)


def reorder_rows(
    cache: mx.array, sources: mx.array, n_positions: int | mx.array, start: int | mx.array = 0
) -> mx.array:
    """A self-attention cache (rows, n_ctx, state) with row i's positions [start, n_positions)
    taken from row sources[i] (sources: (rows,) int32) and the other positions as they were, as
    numpy's `cache[:, start:n] = cache[sources][:, start:n]` (beam search: each beam continues
    another's sequence; the positions before `start`, a window's prompt, are alike in its rows).
    Where the kernels run, in place: the result is the cache's memory (as the decoder step's
    caches are; the cache passed in changes too), and only the rows whose source differs are
    copied.  Elsewhere MLX's ops, over the second-to-last axis (padded heads too)."""
    span = mx.concatenate([_one_int32(start), _one_int32(n_positions)])
    module = _on_cpu()
    if module is not None and cache.ndim == 3:
        return module.reorder_rows(cache, sources, span)
    positions = mx.arange(cache.shape[-2]).reshape(-1, 1)
    return mx.where((positions >= span[0]) & (positions < span[1]), cache[sources], cache)


def steps_over_features(features: mx.array, n_head: int) -> bool:
    """Whether `decoder_layer_step` runs over these audio features (batch, frames, state) here."""
    batch, _, state = features.shape
    head_dim = state // n_head
    return (
        runs_avx512()
        and features.dtype == mx.float32
        and batch <= MATVEC_ROWS
        and head_dim % 16 == 0
        and state % PANEL_WIDTH == 0
    )


def pack_features(features: mx.array) -> tuple[mx.array, mx.array]:
    """Audio features f (batch, frames, state) as a step over them reads them: frame panels (batch,
    frames / 32 rounded up, state, 32), [b, p, c, j] = f[b, 32 p + j, c] (0 past the last frame),
    for the scores; and channel panels (batch, state / 32, frames, 32), [b, p, i, j] = f[b, i,
    32 p + j], for the weighted sums.  Each panel is one contiguous stream."""
    batch, frames, state = features.shape
    padded = mx.pad(features, [(0, 0), (0, -frames % PANEL_WIDTH), (0, 0)])
    frame_panels = padded.reshape(batch, -1, PANEL_WIDTH, state).transpose(0, 1, 3, 2)
    channel_panels = features.reshape(batch, frames, -1, PANEL_WIDTH).transpose(0, 2, 1, 3)
    return mx.contiguous(frame_panels), mx.contiguous(channel_panels)


def greedy_choice(
    logits: mx.array, forbidden: mx.array, ranges: mx.array, timestamp_begin: int | None
) -> tuple[mx.array, mx.array] | None:
    """`rules.greedy_choice` as one kernel call: each row's likeliest allowed token and its
    log-probability, in two passes over the vocabulary where MLX's ops make a dozen (their exp
    one lane at a time).  None where the kernels do not run."""
    module = _on_cpu()
    if module is None:
        return None
    first_timestamp = logits.shape[-1] if timestamp_begin is None else timestamp_begin
    chosen, logprobs = module.token_choice(logits, forbidden, ranges, first_timestamp)
    return chosen, logprobs


def top_choices(
    logits: mx.array, forbidden: mx.array, ranges: mx.array, timestamp_begin: int | None, k: int
) -> tuple[mx.array, mx.array]:
    """`rules.top_choices` as one kernel call: each row's k likeliest allowed tokens (rows, k),
    largest first and the lower id first among equals, and their log-probabilities."""
    first_timestamp = logits.shape[-1] if timestamp_begin is None else timestamp_begin
    ids, logprobs = _on_cpu().token_choice(logits, forbidden, ranges, first_timestamp, k)
    return ids, logprobs


def attends_cache(head_dim: int) -> bool:
    """Whether `cached_attention` runs the compiled kernel here (the cache layout it reads)."""
    return available() and head_dim % 16 == 0


def cached_attention(q: mx.array, k: mx.array, v: mx.array, offset: mx.array, n_head: int) -> mx.array:
    """Causal attention of q (batch, queries, state), at positions `offset` (int32, one element)
    onwards, over a key cache k, v (batch, n_ctx, state): query i sees keys [0, offset + i].
    Only where `attends_cache` (elsewhere the decoder keeps its cache as padded heads)."""
    head_dim = q.shape[-1] // n_head
    if not attends_cache(head_dim):
        raise RuntimeError("the compiled attention does not run here: the cache should be padded heads")
    # Only the keys written so far are read; no mask is built.
    return _on_cpu().attention(q, k, v, n_head, head_dim**-0.5, offset)


def multi_head_attention(q: mx.array, k: mx.array, v: mx.array, n_head: int, mask: mx.array | None = None) -> mx.array:
    """Scaled dot-product attention of q (batch, queries, state) over k, v (batch, keys, state).

    The state splits into `n_head` heads; the result has q's shape, heads merged back.
    `mask` is additive, broadcast against (batch, heads, queries, keys).
    """
    batch, n_q, n_state = q.shape
    head_dim = n_state // n_head
    scale = head_dim**-0.5
    module = _on_cpu()
    # One primitive for the whole attention: the (heads, queries, keys) scores never reach
    # memory, and the heads are read in place.
    if module is not None and mask is None and head_dim % 16 == 0:
        return module.attention(q, k, v, n_head, scale)

    def heads(t: mx.array) -> mx.array:
        return t.reshape(batch, t.shape[1], n_head, head_dim).transpose(0, 2, 1, 3)

    if module is None:
        out = mx.fast.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=scale, mask=mask)
    else:
        # MLX computes its CPU attention this way too, with its own (slower) softmax.
        scores = (heads(q) * scale) @ heads(k).swapaxes(-1, -2)
        if mask is not None:
            scores = scores + mask
        out = module.softmax(scores) @ heads(v)
    return out.transpose(0, 2, 1, 3).reshape(batch, n_q, n_state)
