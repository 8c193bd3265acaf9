// The kernels' shared header: the CPU features they check, the target attributes of their AVX2
// and AVX-512 code, and the functions one file defines for the others.
//
// Why these kernels: the mlx[cpu] wheel for Linux is built for baseline x86-64, so its exp/erf
// run one lane at a time, and a CPU stream runs on one thread.  These kernels use AVX2+FMA+F16C
// (checked at run time: the library loads on any CPU, and without AVX2 refuses to build its
// primitives, so the engine keeps MLX's ops) and split the work across the cores the process
// may use.  Computed in float32 (other float dtypes are cast in and out).
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

#include "mlx/mlx.h"

namespace mx = mlx::core;

#if defined(__x86_64__)
#define MENNY_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MENNY_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma,f16c")))
#define MENNY_AVX512_VNNI __attribute__((target("avx512f,avx512vl,avx512bw,avx512vnni,avx2,fma,f16c")))
#endif

namespace menny {

// Whether this CPU runs the AVX2+FMA+F16C kernels, which every primitive needs.
bool uses_avx2();
// Whether it runs the AVX-512 ones (the panel product, a step over the audio features).  False
// with MENNY_KERNELS_AVX2_ONLY=1 in the environment when the library loads: the AVX2 paths,
// tested on an AVX-512 CPU.
bool uses_avx512();
// Whether it runs the AVX-512 VNNI product of 8-bit weights (false wherever uses_avx512() is).
bool uses_avx512_vnni();

// A product's output columns come 32 at a time from a panel: the 32 weight rows' values for
// each input column in turn, (depth, 32) contiguous, packed by the call (strip_product).
constexpr std::size_t kPanelWidth = 32;

// Rows of `rows` rows of row_bytes bytes each: row i's bytes [first, first + span_bytes) become
// row sources[i]'s, in place (reorder_rows.cpp).
void reorder_rows_in_place(char* cache, const std::int32_t* sources, std::size_t rows, std::size_t row_bytes,
                           std::size_t first, std::size_t span_bytes);

// Layer norm of `rows` rows of n values, the same bits as mx.fast.layer_norm (maths.cpp).
void layer_norm_rows(const float* x, const float* weight, const float* bias, float* out, std::size_t rows,
                     std::size_t n, float eps);

#if defined(__x86_64__)
// maths.cpp: out = e^(scale * (in - max(in))) for one row (scale > 0; in place is fine); returns
// the sum.  Softmax of rows of n; exact GELU of n values.
MENNY_AVX2 float exp_row_avx2(const float* in, float* out, std::size_t n, float scale);
MENNY_AVX2 void softmax_rows_avx2(const float* in, float* out, std::size_t rows, std::size_t n);
MENNY_AVX2 void gelu_avx2(const float* in, float* out, std::size_t n);

// attention.cpp: scores of a few queries straight from key rows; one query's weighted sum of
// value rows (rows from `split` on from b_after); one block of queries of one head; a whole
// attention (see there).
MENNY_AVX2 void scores_direct_avx2(const float* q, const float* k, float* scores, std::size_t rows, std::size_t keys,
                                   std::size_t ld_scores, std::size_t head_dim, std::size_t row_stride);
MENNY_AVX2 void row_times_matrix_avx2(const float* a, const float* b, const float* b_after, std::size_t split,
                                      std::size_t ldb, float* out, std::size_t cols, std::size_t depth, float scale);
MENNY_AVX2 void attention_block_avx2(const float* q, const float* keys_t, const float* k, const float* values_t,
                                     const float* v, float* out, float* scores, float* inverse_sums, std::size_t rows,
                                     std::size_t keys, std::size_t ld_scores, std::size_t head_dim,
                                     std::size_t row_stride, float scale, std::size_t visible);
void attention(const float* q, const float* k, const float* v, float* out, std::size_t batch, std::size_t n_q,
               std::size_t n_k, std::size_t kv_rows, std::size_t state, std::size_t n_head, float scale,
               std::ptrdiff_t causal_offset);

// panels.cpp (AVX-512): rows of A times one panel; a query folded through rows of a weight
// matrix; a product over panels packed as it goes.  W: float, or std::uint16_t for float16 bits.
MENNY_AVX512 void panel_rows(const float* a, std::size_t lda, const float* panel, std::size_t depth,
                             const float* bias, bool gelu, const float* residual, float* c, std::size_t ldc,
                             std::size_t rows);
template <class W>
MENNY_AVX512 void fold_rows(const float* q, const W* w, std::size_t rows, std::size_t depth, float* folded);
template <class W>
MENNY_AVX512 void strip_product(const float* x, const W* w, std::size_t depth, std::size_t n, std::size_t rows,
                                const float* bias, bool gelu, const float* residual, float* out, std::size_t begin,
                                std::size_t end);

// A weight matrix (n, depth), row-major, float32 or float16 (raw bits).
struct Matrix {
  const void* data;
  bool half;

  explicit Matrix(const mx::array& w)
      : data(w.dtype() == mx::float16 ? static_cast<const void*>(w.data<mx::float16_t>()) : w.data<float>()),
        half(w.dtype() == mx::float16) {}

  // fn(the weights, typed: float16 as raw bits, or float32).
  template <class Fn>
  void with_weights(Fn fn) const {
    if (half) {
      fn(static_cast<const std::uint16_t*>(data));
    } else {
      fn(static_cast<const float*>(data));
    }
  }

  // Rows [begin, end) of x (n_x, depth) @ this.T (+ bias), row j of the result at out + j * ld_out
  // (matvec.cpp).
  void times(const float* x, std::size_t n_x, const float* bias, std::size_t depth, float* out, std::size_t ld_out,
             std::size_t begin, std::size_t end) const;
};
#endif

}  // namespace menny
