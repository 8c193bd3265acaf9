"""One CUDA kernel for a decoding step's projections on NVIDIA GPUs.

On a CUDA GPU MLX spends host time on every operation it evaluates, and a one-token decoder
step is ~140 small operations: the host, not the GPU, bounds it (bench/GPU.md).
`fused_linear` does in one kernel (`mx.fast.cuda_kernel`) what MLX runs as up to four
operations: a layer norm of the input, the product with a weight matrix plus bias, exact
GELU, a residual add.  It is made for a step's few rows: one warp per output feature
reads that feature's weights once for every row.  Anywhere else (no CUDA, many rows,
quantized or non-fp16 weights) it returns None and the caller composes MLX's ops.
"""

from __future__ import annotations

import functools

import mlx.core as mx

# Rows are accumulated in registers, one sum per row and lane.
MAX_ROWS = 32
THREADS = 256
# Each lane reads eight values (16 bytes) at a time.
DEPTH_MULTIPLE = 8

_HEADER = """
__device__ inline void load8(const __half* p, float* out) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __half2* pairs = reinterpret_cast<const __half2*>(&raw);
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(pairs[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

__device__ inline float warp_sum(float s) {
    #pragma unroll
    for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffff, s, o);
    return s;
}
"""

_STATISTICS = """
    // The block's warps share out the rows' mean and inverse deviation (two passes: the
    // residual stream's values can be large next to their spread).
    __shared__ float mean[MAX_ROWS];
    __shared__ float inverse_deviation[MAX_ROWS];
    for (int r = warp; r < rows; r += THREADS / 32) {
        const __half* row = x + r * DEPTH;
        float v[8], sum = 0.0f, squares = 0.0f;
        #pragma unroll
        for (int k = lane * 8; k < DEPTH; k += 256) {
            load8(row + k, v);
            #pragma unroll
            for (int i = 0; i < 8; ++i) sum += v[i];
        }
        const float m = warp_sum(sum) / DEPTH;
        #pragma unroll
        for (int k = lane * 8; k < DEPTH; k += 256) {
            load8(row + k, v);
            #pragma unroll
            for (int i = 0; i < 8; ++i) squares += (v[i] - m) * (v[i] - m);
        }
        squares = warp_sum(squares);
        if (lane == 0) {
            mean[r] = m;
            inverse_deviation[r] = rsqrtf(squares / DEPTH + eps[0]);
        }
    }
    __syncthreads();
"""

_PRODUCT = """
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int feature = blockIdx.x * (THREADS / 32) + warp;
    int rows = 1;
    for (int i = 0; i < x_ndim - 1; ++i) rows *= x_shape[i];
    {statistics}
    if (feature >= FEATURES) return;
    // Unrolled to MAX_ROWS so that the sums stay in registers.
    float sums[MAX_ROWS];
    #pragma unroll
    for (int r = 0; r < MAX_ROWS; ++r) sums[r] = 0.0f;
    const __half* weights = weight + (size_t)feature * DEPTH;
    #pragma unroll
    for (int k = lane * 8; k < DEPTH; k += 256) {{
        float w[8], v[8];
        load8(weights + k, w);
        {load_norm}
        #pragma unroll
        for (int r = 0; r < MAX_ROWS; ++r) {{
            if (r >= rows) break;
            load8(x + r * DEPTH + k, v);
            #pragma unroll
            for (int i = 0; i < 8; ++i) sums[r] += {normalized} * w[i];
        }}
    }}
    #pragma unroll
    for (int r = 0; r < MAX_ROWS; ++r) {{
        if (r >= rows) break;
        const float s = warp_sum(sums[r]);
        if (lane == 0) {{
            float y = s{add_bias};
            {gelu}
            {add_residual}
            out[r * FEATURES + feature] = __float2half(y);
        }}
    }}
"""

_LOAD_NORM = """float g[8], b[8];
        load8(norm_weight + k, g);
        load8(norm_bias + k, b);"""
_NORMALIZED = "((v[i] - mean[r]) * inverse_deviation[r] * g[i] + b[i])"


def available() -> bool:
    """Whether MLX computes on a CUDA GPU here and now (not an Apple GPU: mlx builds for Metal
    may lack `mx.cuda`)."""
    cuda = getattr(mx, "cuda", None)
    return mx.default_device() == mx.gpu and cuda is not None and cuda.is_available()


@functools.cache
def _kernel(bias: bool, norm: bool, residual: bool, gelu: bool):
    inputs = ["x", "weight"] + ["bias"] * bias + ["norm_weight", "norm_bias", "eps"] * norm + ["residual"] * residual
    source = _PRODUCT.format(
        statistics=_STATISTICS if norm else "",
        load_norm=_LOAD_NORM if norm else "",
        normalized=_NORMALIZED if norm else "v[i]",
        add_bias=" + __half2float(bias[feature])" if bias else "",
        gelu="y = 0.5f * y * (1.0f + erff(y * 0.70710678118654752f));" if gelu else "",
        add_residual="y += __half2float(residual[r * FEATURES + feature]);" if residual else "",
    )
    name = "menny_linear" + "_bias" * bias + "_norm" * norm + "_residual" * residual + "_gelu" * gelu
    return mx.fast.cuda_kernel(name=name, input_names=inputs, output_names=["out"], source=source, header=_HEADER)


def fused_linear(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
    *,
    norm: tuple[mx.array, mx.array, float] | None = None,
    residual: mx.array | None = None,
    gelu: bool = False,
) -> mx.array | None:
    """GELU?(norm?(x) @ weight.T + bias) + residual in one kernel, for x (..., depth) and weight
    (features, depth); `norm` is a layer norm's (weight, bias, eps).  None where it does not run."""
    depth, features = x.shape[-1], weight.shape[0]
    rows = x.size // depth
    arrays = [x, weight, bias, *(norm[:2] if norm else ()), residual]
    if (
        not available()
        or rows > MAX_ROWS
        or depth % DEPTH_MULTIPLE
        or weight.shape[1] != depth
        or any(a is not None and a.dtype != mx.float16 for a in arrays)
    ):
        return None
    inputs = [x, weight]
    if bias is not None:
        inputs.append(bias)
    if norm is not None:
        inputs += [norm[0], norm[1], mx.array([norm[2]], dtype=mx.float32)]
    if residual is not None:
        inputs.append(residual)
    kernel = _kernel(bias is not None, norm is not None, residual is not None, gelu)
    warps_per_block = THREADS // 32
    blocks = -(-features // warps_per_block)
    return kernel(
        inputs=inputs,
        template=[("MAX_ROWS", MAX_ROWS), ("DEPTH", depth), ("FEATURES", features), ("THREADS", THREADS)],
        grid=(blocks * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(*x.shape[:-1], features)],
        output_dtypes=[x.dtype],
    )[0]
