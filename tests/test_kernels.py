"""The compiled CPU kernels (whisper/kernels) against MLX's own ops and exact float64 values.

scripts/test builds the kernels first, so a missing or broken build fails here; only
MENNY_NO_KERNELS=1 (which forces MLX's ops everywhere) skips the compiled-kernel tests.
"""

from __future__ import annotations

import math
import os
import resource
import subprocess
import sys
import threading

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from speech import REPO, SPEECH_DIR

import whisper
from whisper import kernels
from whisper.audio import N_SAMPLES, load_audio
from whisper.backends.cpu import convolve_gelu, store_in_half

FORCED_OFF = os.environ.get("MENNY_NO_KERNELS") == "1"
needs_kernels = pytest.mark.skipif(FORCED_OFF, reason="MENNY_NO_KERNELS=1 forces MLX's own ops")
RNG = np.random.default_rng(6)


@pytest.fixture(scope="module")
def fast():
    module, detail = kernels.load()
    if detail == kernels.NO_AVX2:
        pytest.skip(detail)
    assert module is not None, f"the compiled kernels did not load: {detail}"
    return module


def exact_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def exact_gelu(x: np.ndarray) -> np.ndarray:
    return np.array([v * 0.5 * math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64).ravel()]).reshape(x.shape)


@needs_kernels
def test_the_kernels_are_built_and_used_on_this_cpu(fast):
    assert kernels.compiled() is fast
    assert fast.threads() >= 1


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 8), (5, 9), (4, 1500), (1, 6, 40, 1500), (2, 3, 1, 17)])
def test_softmax_matches_mlx_and_exact_values(fast, shape):
    x = (RNG.standard_normal(shape) * 6).astype(np.float32)
    ours = np.array(fast.softmax(mx.array(x)))
    reference = np.array(mx.softmax(mx.array(x), axis=-1, precise=True))
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours, exact_softmax(x), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(ours.sum(axis=-1), 1.0, rtol=1e-5)


@needs_kernels
def test_softmax_of_large_and_masked_scores(fast):
    x = (RNG.standard_normal((6, 1500)) * 3).astype(np.float32)
    x[0] -= 1e30  # everything hugely negative: only differences matter
    x[1, ::3] = -np.inf  # an additive mask
    x[2, :-1] = -np.inf  # one survivor
    x[3] = -1e4  # all equal
    x[3, 5] = 0.0
    x[4, 100:] = -100.0  # far below the maximum: exp underflows to 0
    x[5] *= 1000
    ours = np.array(fast.softmax(mx.array(x)))
    reference = np.array(mx.softmax(mx.array(x), axis=-1, precise=True))
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-7)
    assert np.all(ours[1, ::3] == 0)
    np.testing.assert_array_equal(ours[2], np.eye(1500, dtype=np.float32)[-1])
    assert ours[3, 5] == 1.0


@needs_kernels
def test_softmax_propagates_nan_like_mlx(fast):
    x = np.zeros((3, 10), np.float32)
    x[0] = -np.inf  # a fully masked row has no distribution
    x[1, 4] = np.nan
    x[2, 4] = np.inf
    ours = np.array(fast.softmax(mx.array(x)))
    reference = np.array(mx.softmax(mx.array(x), axis=-1, precise=True))
    assert np.isnan(ours).all() and np.isnan(reference).all()


@needs_kernels
def test_softmax_of_non_contiguous_views(fast):
    base = mx.array((RNG.standard_normal((40, 30)) * 4).astype(np.float32))
    for view in (
        base.T,
        base[::3, 1::2],
        mx.broadcast_to(base[:1], (5, 30)),
        base.reshape(2, 20, 30).transpose(1, 0, 2),
    ):
        np.testing.assert_allclose(
            np.array(fast.softmax(view)), np.array(mx.softmax(view, axis=-1, precise=True)), rtol=1e-5, atol=1e-7
        )


@needs_kernels
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(fast, dtype):
    x = mx.array((RNG.standard_normal((8, 333)) * 4).astype(np.float32)).astype(dtype)
    ours = fast.softmax(x)
    assert ours.dtype == dtype
    reference = mx.softmax(x, axis=-1, precise=True)
    # Both round the same float32 values; at most one unit in the last place apart.
    np.testing.assert_allclose(np.array(ours.astype(mx.float32)), np.array(reference.astype(mx.float32)), rtol=1e-2)
    gelu = fast.gelu(x)
    assert gelu.dtype == dtype
    np.testing.assert_allclose(
        np.array(gelu.astype(mx.float32)), np.array(nn.gelu(x.astype(mx.float32))), rtol=1e-2, atol=1e-3
    )


@needs_kernels
@pytest.mark.parametrize("size", [1, 7, 8, 9, 16, 100, 1500 * 384])
def test_gelu_matches_mlx_and_exact_values(fast, size):
    x = (RNG.standard_normal(size) * 3).astype(np.float32)
    ours = np.array(fast.gelu(mx.array(x)))
    np.testing.assert_allclose(ours, np.array(nn.gelu(mx.array(x))), rtol=1e-5, atol=1e-6)
    if size <= 10_000:
        np.testing.assert_allclose(ours, exact_gelu(x), rtol=1e-6, atol=1e-30)


@needs_kernels
def test_gelu_edge_values(fast):
    x = np.array([0.0, -0.0, 1e-30, -1e-30, 1e-40, 5.0, -5.0, 9.9, -9.9, 14.0, -14.0, 20.0, -20.0, -30.0, 1e4, -1e4,
                  np.inf, -np.inf, np.nan], np.float32)  # fmt: skip
    ours = np.array(fast.gelu(mx.array(x)))
    finite = np.isfinite(x)
    np.testing.assert_allclose(ours[finite], exact_gelu(x[finite]), rtol=1e-6, atol=1e-37)
    # Negative values keep their relative accuracy far into the tail, where erf(x) rounds to -1.
    assert ours[8] == pytest.approx(-9.9 * 0.5 * math.erfc(9.9 / math.sqrt(2)), rel=1e-6) and ours[8] < -1e-22
    assert ours[-3] == np.inf and np.isnan(ours[-2]) and np.isnan(ours[-1])
    reference = np.array(nn.gelu(mx.array(x)))
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(reference))


@needs_kernels
def test_kernels_take_unevaluated_inputs_and_leave_them_intact(fast):
    a = mx.array(RNG.standard_normal((300, 64)).astype(np.float32))
    scores = a @ a.T  # not evaluated yet: the kernel must wait for the product
    probabilities = fast.softmax(scores)
    activated = fast.gelu(scores)
    mx.eval(probabilities, activated, scores)
    expected = np.array(a) @ np.array(a).T
    np.testing.assert_allclose(np.array(scores), expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.array(probabilities), exact_softmax(np.array(scores)), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.array(activated), np.array(nn.gelu(scores)), rtol=1e-5, atol=1e-6)
    # A temporary may be overwritten in place; the result stays right.
    np.testing.assert_allclose(
        np.array(fast.softmax(scores * 0.5)), exact_softmax(expected * 0.5), rtol=1e-4, atol=1e-7
    )


@needs_kernels
def test_non_float_input_is_refused_with_a_message(fast):
    with pytest.raises(ValueError, match="floating-point"):
        fast.softmax(mx.array([[1, 2, 3]]))


def reference_attention(q: mx.array, k: mx.array, v: mx.array, n_head: int, mask=None) -> np.ndarray:
    batch, n_q, state = q.shape

    def heads(t):
        return t.reshape(batch, t.shape[1], n_head, state // n_head).transpose(0, 2, 1, 3)

    out = mx.fast.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=(state // n_head) ** -0.5, mask=mask)
    return np.array(out.transpose(0, 2, 1, 3).reshape(batch, n_q, state))


def random_qkv(batch: int, n_q: int, n_k: int, state: int, spread: float = 1.0) -> list[mx.array]:
    return [mx.array((RNG.standard_normal((batch, n, state)) * spread).astype(np.float32)) for n in (n_q, n_k, n_k)]


@needs_kernels
@pytest.mark.parametrize(
    ("batch", "n_q", "n_k", "n_head", "head_dim"),
    [(1, 1500, 1500, 6, 64), (2, 7, 13, 2, 16), (1, 49, 100, 3, 32), (1, 97, 1, 1, 16), (3, 1, 17, 2, 64)],
)
def test_fused_attention_matches_mlx(fast, batch, n_q, n_k, n_head, head_dim):
    q, k, v = random_qkv(batch, n_q, n_k, n_head * head_dim, spread=2.0)
    ours = np.array(fast.attention(q, k, v, n_head, head_dim**-0.5))
    np.testing.assert_allclose(ours, reference_attention(q, k, v, n_head), rtol=1e-4, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("head_dim", [16, 32, 48, 64, 80])
def test_one_query_attends_as_the_same_query_among_several(fast, head_dim):
    # A single query (a decoding step) takes its own path over the values; the sums must be the same.
    q, k, v = random_qkv(2, 3, 1500, 2 * head_dim, spread=2.0)
    several = fast.attention(q, k, v, 2, head_dim**-0.5)
    assert mx.array_equal(fast.attention(q[:, 1:2], k, v, 2, head_dim**-0.5), several[:, 1:2]).item()


@needs_kernels
def test_fused_attention_takes_views_and_half_precision(fast):
    q, k, v = random_qkv(1, 40, 60, 128)
    views = [t.transpose(1, 0, 2).transpose(1, 0, 2)[:, ::2] for t in (q, k, v)]
    ours = np.array(fast.attention(*views, 4, 32**-0.5))
    np.testing.assert_allclose(ours, reference_attention(*views, 4), rtol=1e-4, atol=1e-5)
    half = [t.astype(mx.float16) for t in (q, k, v)]
    ours = fast.attention(*half, 4, 32**-0.5)
    assert ours.dtype == mx.float16
    np.testing.assert_allclose(
        np.array(ours.astype(mx.float32)), reference_attention(*[t.astype(mx.float32) for t in half], 4), atol=2e-3
    )


@needs_kernels
def test_fused_attention_refuses_what_it_cannot_do(fast):
    q, k, v = random_qkv(1, 4, 4, 40)
    with pytest.raises(ValueError, match="multiple of 16"):
        fast.attention(q, k, v, 4, 0.3)  # heads of 10
    with pytest.raises(ValueError, match="batch, keys, state"):
        fast.attention(q, k[:, :, :16], v, 1, 0.3)
    with pytest.raises(ValueError, match="positive"):
        fast.attention(q[..., :32], k[..., :32], v[..., :32], 2, 0.0)


@needs_kernels
@pytest.mark.usefixtures("fast")
@pytest.mark.parametrize(
    ("n_q", "n_k", "masked"), [(1500, 1500, False), (1, 1500, False), (5, 9, True), (3, 448, False)]
)
def test_multi_head_attention_matches_mlx(n_q, n_k, masked):
    q, k, v = random_qkv(1, n_q, n_k, 512)
    mask = mx.triu(mx.full((n_q, n_k), -np.inf), k=n_k - n_q + 1) if masked else None
    ours = np.array(kernels.multi_head_attention(q, k, v, 8, mask))
    np.testing.assert_allclose(ours, reference_attention(q, k, v, 8, mask), rtol=1e-4, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize(("rows", "depth", "n"), [((1, 1), 384, 51864), ((5, 1), 512, 1003), ((2, 3), 20, 7)])
def test_matvec_matches_float64(fast, rows, depth, n):
    x = RNG.standard_normal((*rows, depth)).astype(np.float32)
    w = RNG.standard_normal((n, depth)).astype(np.float32)
    ours = np.array(fast.matvec(mx.array(x), mx.array(w)))
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    assert ours.shape == (*rows, n)
    np.testing.assert_allclose(ours, exact, rtol=1e-4, atol=1e-4 * np.sqrt(depth))


@needs_kernels
@pytest.mark.parametrize("dtype", [mx.float16, mx.float32])
def test_each_row_of_a_matvec_has_the_bits_of_that_row_alone(fast, dtype):
    """Several rows (beams) share each weight's read, in tiles of rows: the sums stay each row's own."""
    w = mx.array(RNG.standard_normal((1003, 389)).astype(np.float32)).astype(dtype)  # ragged tiles and depth
    bias = mx.array(RNG.standard_normal(1003).astype(np.float32))
    x = mx.array(RNG.standard_normal((11, 389)).astype(np.float32))
    alone = np.concatenate([np.array(fast.matvec(x[i : i + 1], w, bias)) for i in range(11)])
    for rows in range(2, 12):
        assert np.array_equal(np.array(fast.matvec(x[:rows], w, bias)), alone[:rows]), rows


@needs_kernels
def test_matvec_of_float16_weights_is_that_of_the_same_values_in_float32(fast):
    x = mx.array(RNG.standard_normal((1, 3, 384)).astype(np.float32))
    w = mx.array(RNG.standard_normal((1003, 384)).astype(np.float16))
    bias = mx.array(RNG.standard_normal(1003).astype(np.float32))
    half = fast.matvec(x, w, bias)
    assert half.dtype == mx.float32
    assert mx.array_equal(half, fast.matvec(x, w.astype(mx.float32), bias)).item()


@pytest.fixture(scope="module")
def panels_here(fast):
    if not fast.uses_avx512():
        pytest.skip("the panel product needs AVX-512")
    return fast


@needs_kernels
@pytest.mark.parametrize(
    ("rows", "depth", "n"), [((1, 1500), 384, 1536), ((2, 37), 512, 64), ((13,), 80, 32), ((1, 9), 7, 96)]
)
def test_panel_product_matches_float64(panels_here, rows, depth, n):
    x = RNG.standard_normal((*rows, depth)).astype(np.float32)
    w = RNG.standard_normal((n, depth)).astype(np.float16)
    bias = RNG.standard_normal(n).astype(np.float32)
    assert kernels.multiplies_in_panels(mx.array(w))
    ours = np.array(kernels.panel_product(mx.array(x), mx.array(w), mx.array(bias)))
    exact = x.astype(np.float64) @ w.astype(np.float64).T + bias
    assert ours.shape == (*rows, n)
    np.testing.assert_allclose(ours, exact, rtol=1e-4, atol=1e-4 * np.sqrt(depth))
    # float32 weights of the same values give the same bits, and so does a view into a larger
    # buffer (as the decoder keeps its weights); no bias is no bias.
    same = kernels.panel_product(mx.array(x), mx.array(w).astype(mx.float32), mx.array(bias))
    assert np.array_equal(np.array(same), ours)
    buffer = mx.concatenate([mx.zeros(5, mx.float16), mx.array(w).reshape(-1)])
    view = buffer[5:].reshape(n, depth)
    assert np.array_equal(np.array(kernels.panel_product(mx.array(x), view, mx.array(bias))), ours)
    unbiased = np.array(kernels.panel_product(mx.array(x), mx.array(w)))
    np.testing.assert_allclose(unbiased, exact - bias, rtol=1e-4, atol=1e-4 * np.sqrt(depth))


@needs_kernels
def test_panel_product_gelu_and_residual_are_the_separate_ops_bit_for_bit(panels_here):
    x = mx.array(RNG.standard_normal((3, 50, 64)).astype(np.float32))
    w = mx.array(RNG.standard_normal((96, 64)).astype(np.float16))
    bias = mx.array(RNG.standard_normal(96).astype(np.float32))
    residual = mx.array(RNG.standard_normal((3, 50, 96)).astype(np.float32))
    plain = kernels.panel_product(x, w, bias)
    fused = kernels.panel_product(x, w, bias, gelu=True, residual=residual)
    assert mx.array_equal(fused, residual + kernels.gelu(plain)).item()
    assert mx.array_equal(kernels.panel_product(x, w, bias, residual=residual), residual + plain).item()


@needs_kernels
def test_panel_product_refuses_what_it_cannot_do(panels_here):
    x = mx.zeros((4, 64))
    assert not kernels.multiplies_in_panels(mx.zeros((48, 64)))  # not a multiple of 32 outputs
    with pytest.raises(ValueError, match="matrix"):
        panels_here.panel_product(x, mx.zeros((48, 64)))
    with pytest.raises(ValueError, match="matrix"):
        panels_here.panel_product(x, mx.zeros((64, 32)))  # depth 32 against x's 64
    with pytest.raises(ValueError, match="residual"):
        panels_here.panel_product(x, mx.zeros((32, 64)), None, mx.zeros((4, 64)))


@needs_kernels
def test_weights_kept_in_half_hold_the_same_values():
    exact, inexact = nn.Linear(64, 96), nn.Linear(64, 96)
    exact.weight = exact.weight.astype(mx.float16).astype(mx.float32)  # values a float16 checkpoint holds
    values = np.array(exact.weight)
    assert store_in_half([exact, inexact]) == [exact]
    assert exact.weight.dtype == mx.float16 and np.array_equal(np.array(exact.weight, dtype=np.float32), values)
    assert inexact.weight.dtype == mx.float32
    x = mx.array(RNG.standard_normal((20, 64)).astype(np.float32))
    ours = kernels.linear(x, exact.weight, exact.bias)
    np.testing.assert_allclose(np.array(ours), np.array(x) @ values.T + np.array(exact.bias), atol=1e-4)


@needs_kernels
@pytest.mark.usefixtures("panels_here")
@pytest.mark.parametrize(("stride", "frames"), [(1, 3000), (2, 3000), (2, 7), (1, 1)])
def test_convolution_as_a_panel_product_is_mlx_convolution(stride, frames):
    layer = nn.Conv1d(80, 64, kernel_size=3, stride=stride, padding=1)
    x = mx.array(RNG.standard_normal((2, frames, 80)).astype(np.float32))
    expected = np.array(kernels.gelu(layer(x)))
    ours = np.array(convolve_gelu(layer, x))
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    with kernels.fallback():  # MLX's own ops
        assert mx.array_equal(convolve_gelu(layer, x), nn.gelu(layer(x))).item()


def quantized_weights(n: int, depth: int) -> tuple[mx.array, mx.array, mx.array, np.ndarray]:
    """8-bit weights (n, depth) as load_model(..., quantize=8) makes them, and their values."""
    w = mx.array((RNG.standard_normal((n, depth)) / np.sqrt(depth)).astype(np.float32))
    packed, scales, biases = mx.quantize(w, group_size=64, bits=8)
    return packed, scales, biases, np.array(mx.dequantize(packed, scales, biases, group_size=64, bits=8))


def quantized_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x's rows as the quantized product rounds them, in float32 as it does: (s, p), x ~ s p."""
    top = np.abs(x).max(axis=-1, keepdims=True)
    inverse = np.float32(127) / np.where(top > 0, top, np.float32(1))
    return top / np.float32(127), np.rint(x * inverse)


@needs_kernels
@pytest.mark.usefixtures("fast")
@pytest.mark.parametrize(
    ("rows", "depth", "n", "with_bias"),
    [((1, 1500), 384, 1536, True), ((2, 37), 1280, 64, False), ((1,), 64, 128, True), ((5, 2), 192, 320, True)],
)
def test_quantized_product_is_the_rounded_rows_times_the_weights_values(rows, depth, n, with_bias):
    x = (RNG.standard_normal((*rows, depth)) * 3).astype(np.float32)
    x.reshape(-1, depth)[1::7] = 0  # rows of zeros: their scale is 0, their outputs the bias
    w, scales, biases, values = quantized_weights(n, depth)
    bias = RNG.standard_normal(n).astype(np.float32) if with_bias else None
    ours = np.array(kernels.quantized_product(mx.array(x), w, scales, biases, None if bias is None else mx.array(bias)))
    s, p = quantized_rows(x)
    exact = (s.astype(np.float64) * p) @ values.astype(np.float64).T + (0 if bias is None else bias)
    assert ours.shape == (*rows, n)
    np.testing.assert_allclose(ours, exact, rtol=1e-5, atol=1e-6 * np.abs(exact).max())
    zero_rows = ours.reshape(-1, n)[1::7]
    assert np.array_equal(zero_rows, np.broadcast_to(0 if bias is None else bias, zero_rows.shape))


@needs_kernels
@pytest.mark.usefixtures("fast")
def test_quantized_product_differs_from_mlx_s_by_the_rounding_of_x_alone():
    x = (RNG.standard_normal((3, 500, 512)) * np.linspace(0.1, 20, 512)).astype(np.float32)  # a wide spread
    w, scales, biases, values = quantized_weights(1536, 512)
    ours = np.array(kernels.quantized_product(mx.array(x), w, scales, biases))
    theirs = np.array(mx.quantized_matmul(mx.array(x), w, scales, biases, group_size=64, bits=8))
    s, _ = quantized_rows(x)
    # Each input off by at most s / 2, times each weight's magnitude; float rounding on top.
    bound = s / 2 * np.abs(values).sum(axis=1) + 1e-5 * np.abs(theirs).max()
    assert np.all(np.abs(ours - theirs) <= bound)
    assert np.abs(ours - theirs).max() > 1e-3 * np.abs(theirs).max()  # x is rounded, not used as it is


@needs_kernels
@pytest.mark.usefixtures("fast")
def test_quantized_product_gelu_and_residual_are_the_separate_ops_bit_for_bit():
    x = mx.array(RNG.standard_normal((2, 50, 128)).astype(np.float32))
    w, scales, biases, _ = quantized_weights(192, 128)
    bias = mx.array(RNG.standard_normal(192).astype(np.float32))
    residual = mx.array(RNG.standard_normal((2, 50, 192)).astype(np.float32))
    plain = kernels.quantized_product(x, w, scales, biases, bias)
    fused = kernels.quantized_product(x, w, scales, biases, bias, gelu=True, residual=residual)
    assert mx.array_equal(fused, residual + kernels.gelu(plain)).item()
    added = kernels.quantized_product(x, w, scales, biases, bias, residual=residual)
    assert mx.array_equal(added, residual + plain).item()


@needs_kernels
@pytest.mark.usefixtures("fast")
def test_each_row_of_a_quantized_product_has_the_bits_of_that_row_alone():
    """Rows go through register tiles of three: the sums stay each row's own."""
    x = mx.array(RNG.standard_normal((8, 256)).astype(np.float32))
    w, scales, biases, _ = quantized_weights(128, 256)
    alone = np.concatenate([np.array(kernels.quantized_product(x[i : i + 1], w, scales, biases)) for i in range(8)])
    for rows in range(2, 9):
        assert np.array_equal(np.array(kernels.quantized_product(x[:rows], w, scales, biases)), alone[:rows]), rows
    view = mx.concatenate([x, x], axis=1)[:, 256:]  # not in row order: copied first
    assert np.array_equal(np.array(kernels.quantized_product(view, w, scales, biases)), alone)


@needs_kernels
def test_quantized_product_refuses_what_it_cannot_do(fast):
    x = mx.zeros((4, 128))
    w, scales, biases, _ = quantized_weights(64, 128)
    with pytest.raises(ValueError, match="8-bit weights"):
        fast.quantized_product(x[:, :64], w, scales, biases)  # depth 64 against the weights' 128
    four_bits = mx.quantize(mx.zeros((64, 128)), group_size=64, bits=4)
    with pytest.raises(ValueError, match="8-bit weights"):
        fast.quantized_product(x, *four_bits)
    groups_of_32 = mx.quantize(mx.zeros((64, 128)), group_size=32, bits=8)
    with pytest.raises(ValueError, match="groups of 64"):
        fast.quantized_product(x, *groups_of_32)
    with pytest.raises(ValueError, match="residual"):
        fast.quantized_product(x, w, scales, biases, None, mx.zeros((4, 128)))
    assert kernels.multiplies_quantized(nn.QuantizedLinear(128, 64, group_size=64, bits=8))
    for layer in (
        nn.QuantizedLinear(128, 64, group_size=64, bits=4),
        nn.QuantizedLinear(128, 64, group_size=32, bits=8),
        nn.QuantizedLinear(128, 96, group_size=64, bits=8),  # not a multiple of 64 outputs
        nn.Linear(128, 64),
    ):
        assert not kernels.multiplies_quantized(layer)


@needs_kernels
def test_the_avx2_quantized_product_gives_the_avx512_bits(fast, tmp_path):
    """Exact integer sums and the same float operations: AVX2's vpmaddwd, AVX-512's vpdpbusd."""
    if not fast.uses_avx512_vnni():
        pytest.skip("this CPU runs the AVX2 quantized product anyway")
    cases = {}
    for name, (rows, depth, n) in {"encoder": (1500, 384, 1536), "ragged": (7, 192, 64)}.items():
        w, scales, biases, _ = quantized_weights(n, depth)
        inputs = {
            "x": (RNG.standard_normal((rows, depth)) * 2).astype(np.float32),
            "w": np.array(w),
            "scales": np.array(scales),
            "biases": np.array(biases),
            "bias": RNG.standard_normal(n).astype(np.float32),
            "residual": RNG.standard_normal((rows, n)).astype(np.float32),
        }
        arrays = {key: mx.array(value) for key, value in inputs.items()}
        inputs["out"] = np.array(fast.quantized_product(*arrays.values(), True))
        cases[name] = inputs
        np.savez(tmp_path / f"{name}.npz", **inputs)
    check = (
        "import sys, numpy as np, mlx.core as mx\nfrom whisper import kernels\n"
        "assert kernels.available() and not kernels.compiled().uses_avx512_vnni()\n"
        "for path in sys.argv[1:]:\n"
        "    case = dict(np.load(path))\n"
        "    expected = case.pop('out')\n"
        "    out = kernels.compiled().quantized_product(*(mx.array(v) for v in case.values()), True)\n"
        "    assert np.array_equal(np.array(out), expected), path\n"
    )
    env = {**os.environ, "MENNY_KERNELS_AVX2_ONLY": "1"}
    paths = [str(tmp_path / f"{name}.npz") for name in cases]
    result = subprocess.run([sys.executable, "-c", check, *paths], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@needs_kernels
def test_huge_pages_keep_the_values(fast):
    values = RNG.standard_normal((4096, 1024)).astype(np.float16)  # 8 MB: whole 2 MB pages inside
    a = mx.array(values)
    assert isinstance(fast.huge_pages(a), bool)  # the system may refuse; the values stay
    assert np.array_equal(np.array(a), values)


@needs_kernels
def test_the_avx2_paths_pass_the_kernel_and_step_tests_on_this_cpu_too(fast):
    """MENNY_KERNELS_AVX2_ONLY=1 turns the AVX-512 kernels off when the library loads: the paths
    of a CPU without them (MLX's products, steps over the audio's keys and values), run here."""
    if not fast.uses_avx512():
        pytest.skip("this CPU runs the AVX2 paths anyway")
    env = {**os.environ, "MENNY_KERNELS_AVX2_ONLY": "1"}
    check = "from whisper import kernels\nassert kernels.available() and not kernels.runs_avx512()\n"
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    steps = (
        "test_rows_sharing_an_audio_step_as_over_repeated_copies_of_it",
        "test_the_step_in_one_kernel_call_per_layer_gives_the_bits_of_its_own_ops",
        "test_a_beam_s_candidates_where_the_logits_are_equal_the_host_filters",
        "test_a_window_s_rows_read_the_positions_they_share_once_with_the_same_bits",
    )
    tests = ["tests/test_kernels.py", *(f"tests/test_decode_step.py::{name}" for name in steps)]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not avx2_paths", *tests]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


@needs_kernels
def test_a_library_built_from_other_sources_is_not_loaded(fast, monkeypatch):
    # It would lack the kernels that these sources' engine calls: MLX's ops run instead.
    monkeypatch.setattr(kernels, "sources_sha256", lambda: "0" * 64)
    module, detail = kernels.load.__wrapped__()
    assert module is None
    assert "python -m whisper.kernels.build" in detail


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1500, 512), (3, 1, 384), (13, 100), (2, 5, 20)])
def test_layer_norm_gives_the_bits_of_mlx(fast, shape):
    x = mx.array((RNG.standard_normal(shape) * 20 + 3).astype(np.float32))
    weight, bias = (mx.array(RNG.standard_normal(shape[-1]).astype(np.float32)) for _ in range(2))
    assert mx.array_equal(fast.layer_norm(x, weight, bias, 1e-5), mx.fast.layer_norm(x, weight, bias, 1e-5)).item()


@pytest.mark.parametrize("rows", [1, kernels.MATVEC_ROWS, kernels.MATVEC_ROWS + 1])
def test_linear_is_mlx_linear(rows):
    layer = nn.Linear(64, 48)
    x = mx.array(RNG.standard_normal((1, rows, 64)).astype(np.float32))
    np.testing.assert_allclose(
        np.array(kernels.linear(x, layer.weight, layer.bias)), np.array(layer(x)), rtol=1e-5, atol=1e-5
    )


@needs_kernels
@pytest.mark.parametrize(
    ("batch", "n_q", "offset", "n_head"), [(1, 1, 0, 6), (1, 1, 37, 6), (2, 5, 10, 8), (3, 40, 400, 8)]
)
def test_cached_attention_sees_only_earlier_positions(batch, n_q, offset, n_head):
    n_ctx, state = 448, n_head * 64
    q, k, v = random_qkv(batch, n_q, n_ctx, state)
    ours = np.array(kernels.cached_attention(q, k, v, mx.array([offset], dtype=mx.int32), n_head))
    # Position offset + i sees keys 0 .. offset + i: causal attention over the keys written so far.
    used = offset + n_q
    mask = mx.triu(mx.full((n_q, used), -np.inf), k=offset + 1)
    expected = reference_attention(q, k[:, :used], v[:, :used], n_head, mask)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("sources", "start", "n"),
    [
        ([0, 1, 2, 3, 4], 0, 12),  # nothing moves
        ([1, 0, 3, 4, 2], 0, 7),  # a swap and a cycle of three
        ([2, 2, 2, 0, 1], 0, 20),  # one row to three others, the whole context
        ([4, 3, 2, 1, 0], 0, 0),  # no position written yet
        ([1, 0, 3, 4, 2], 5, 9),  # after a prompt alike in every row
        ([2, 2, 2, 0, 1], 9, 7),  # an empty span
    ],
)
def test_reordered_cache_rows_take_their_sources_span_and_keep_the_rest(sources, start, n):
    values = RNG.standard_normal((5, 20, 32)).astype(np.float32)
    expected = values.copy()
    expected[:, start:n] = values[sources][:, start:n]
    for n_positions in (n, mx.array([n], dtype=mx.int32)):
        cache = mx.array(values)
        mx.eval(cache)
        reordered = kernels.reorder_rows(cache, mx.array(sources, dtype=mx.int32), n_positions, start)
        assert np.array_equal(np.array(reordered), expected)
        if kernels.available():  # in place: the cache passed in is the result
            assert np.array_equal(np.array(cache), expected)
    with kernels.fallback():  # MLX's ops, on padded heads too
        reordered = kernels.reorder_rows(mx.array(values), mx.array(sources), n, start)
        assert np.array_equal(np.array(reordered), expected)
        heads = values.reshape(5, 20, 2, 16).transpose(0, 2, 1, 3)
        reordered = kernels.reorder_rows(mx.array(heads), mx.array(sources), n, start)
        assert np.array_equal(np.array(reordered), expected.reshape(5, 20, 2, 16).transpose(0, 2, 1, 3))


@needs_kernels
def test_reordering_a_view_or_out_of_range_rows(fast):
    values = RNG.standard_normal((3, 10, 32)).astype(np.float32)
    view = mx.array(values).transpose(1, 0, 2).transpose(1, 0, 2)[:, ::2]  # not in row order: copied
    reordered = fast.reorder_rows(view, mx.array([2, 0, 0], dtype=mx.int32), mx.array([0, 3], dtype=mx.int32))
    expected = values[:, ::2].copy()
    expected[:, :3] = values[:, ::2][[2, 0, 0]][:, :3]
    assert np.array_equal(np.array(reordered), expected)
    with pytest.raises(ValueError, match="each source is a row"):
        fast.reorder_rows(mx.array(values), mx.array([0, 3, 1], dtype=mx.int32), mx.array([0, 1], dtype=mx.int32))


def _encoder_features(name: str) -> np.ndarray:
    audio = load_audio(SPEECH_DIR / "jfk.flac")
    mel = whisper.log_mel_spectrogram(np.concatenate([audio, np.zeros(N_SAMPLES - len(audio), np.float32)]))
    return np.array(whisper.load_model(name).embed_audio(mel.T[None, :3000]))


@needs_kernels
@pytest.mark.usefixtures("fast")
def test_encoder_features_agree_with_and_without_the_kernels():
    ours = _encoder_features("tiny.en")
    with kernels.fallback():
        assert kernels.softmax(mx.zeros((1, 1))).item() == 1.0
        reference = _encoder_features("tiny.en")
    # Float32 rounding differs (MLX's erf is a 1.5e-7 approximation); the features may not.
    assert np.abs(ours - reference).max() < 1e-3
    assert np.abs(ours - reference).mean() < 1e-5


def test_a_model_first_run_in_one_thread_transcribes_in_another():
    # MLX gives each thread its own streams: nothing the first pass leaves (the float16 copies of
    # the weights) may be unevaluated.
    model = whisper.load_model("tiny.en")
    mx.eval(model.embed_audio(mx.zeros((1, 3000, model.dims.n_mels))))
    result = {}

    def work() -> None:
        # A live transcript's first frames: too few rows for the panel product, MLX's ops read the matrices.
        result["features"] = np.array(model.embed_audio(mx.zeros((1, 8, model.dims.n_mels)), partial=True))
        result.update(whisper.transcribe(model, SPEECH_DIR / "jfk.flac"))

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert result["features"].shape == (1, 4, model.dims.n_audio_state)
    assert "ask what you can do for your country" in result["text"]


def test_later_windows_reuse_the_memory_of_earlier_ones():
    # glibc would hand the freed activations back to the kernel and fault ~40 MB in again.
    model = whisper.load_model("tiny.en")
    mel = mx.zeros((1, 3000, model.dims.n_mels))
    for _ in range(2):  # the heap grows to the passes' high-water mark
        mx.eval(model.embed_audio(mel))
    faulted_mb = []
    for _ in range(3):  # the median: a one-off fault elsewhere in the process is not the passes'
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        mx.eval(model.embed_audio(mel))
        faulted_mb.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * 4096 / 2**20)
    assert sorted(faulted_mb)[1] < 4, faulted_mb
    assert whisper.configure().keeps_freed_memory


@pytest.mark.parametrize(("given", "expected"), [(None, "4"), ("12", "12")])
def test_openblas_threads_sleep_right_after_a_product_unless_told_otherwise(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if given is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = given
    code = "import os, whisper\nprint(whisper.configure().openblas is not None, os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", expected]


def test_importing_whisper_changes_nothing_in_the_process():
    code = (
        "import os, sys\nbefore = dict(os.environ)\nimport whisper\n"
        "maps = open('/proc/self/maps').read()\n"
        "assert dict(os.environ) == before and 'mlx.core' not in sys.modules and 'openblas' not in maps\n"
        "whisper.load_model\n"  # the first use of an engine name configures the process
        "assert 'openblas' in open('/proc/self/maps').read() and 'OPENBLAS_THREAD_TIMEOUT' in os.environ\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_fallback_on_request_uses_mlx_ops():
    code = (
        "import whisper, mlx.core as mx, numpy as np\nfrom mlx import nn\n"
        "from whisper import kernels\n"
        "assert kernels.compiled() is None and kernels.load()[1] == 'MENNY_NO_KERNELS=1'\n"
        "x = mx.array(np.linspace(-8, 8, 3000, dtype=np.float32).reshape(2, 1500))\n"
        "assert mx.array_equal(kernels.softmax(x), mx.softmax(x, axis=-1, precise=True))\n"
        "assert mx.array_equal(kernels.gelu(x), nn.gelu(x))\n"
        "q = x.reshape(1, 1500, 2, 1).transpose(0, 2, 1, 3)\n"
        "a = kernels.multi_head_attention(x.reshape(1, 1500, 2), x.reshape(1, 1500, 2), x.reshape(1, 1500, 2), 2)\n"
        "b = mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0).transpose(0, 2, 1, 3).reshape(1, 1500, 2)\n"
        "assert mx.array_equal(a, b)\n"
    )
    env = {**os.environ, "MENNY_NO_KERNELS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
