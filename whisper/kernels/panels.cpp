// Products over panels (AVX-512): a weight matrix packed 32 rows at a time into panels, each
// multiplied by all rows of x while it is in the core's cache (the encoder's products, the
// audio's keys and values), and the folded queries of a decoding step over the audio features.
#include <type_traits>
#include <vector>

#include "simd.h"

#if defined(__x86_64__)
namespace menny {

// C[ROWS x 32] = A[ROWS x depth] * panel (depth x 32), plus the bias, GELU'd if asked, plus the
// residual (rows ldc apart, like C's) if given.  2 * ROWS accumulators (ROWS <= 12 of the 32 zmm
// registers), two loads of the panel and ROWS broadcasts of A per 2 * ROWS multiply-adds: at
// ~92 % of this machine's multiply-add peak.  Each output is one chain over the depth in order.
#define MENNY_PANEL_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
template <int ROWS>
MENNY_AVX512 void panel_tile(const float* a, std::size_t lda, const float* panel, std::size_t depth, const float* bias,
                             bool gelu, const float* residual, float* c, std::size_t ldc) {
#define MENNY_DECLARE(r) __m512 acc##r##a = _mm512_setzero_ps(), acc##r##b = _mm512_setzero_ps();
  MENNY_PANEL_ROWS(MENNY_DECLARE)
#undef MENNY_DECLARE
  for (std::size_t k = 0; k < depth; ++k, panel += kPanelWidth) {
    const __m512 b0 = _mm512_loadu_ps(panel);
    const __m512 b1 = _mm512_loadu_ps(panel + 16);
#define MENNY_ACCUMULATE(r)                                 \
  if constexpr (ROWS > r) {                                 \
    const __m512 x = _mm512_set1_ps(a[r * lda + k]);        \
    acc##r##a = _mm512_fmadd_ps(x, b0, acc##r##a);          \
    acc##r##b = _mm512_fmadd_ps(x, b1, acc##r##b);          \
  }
    MENNY_PANEL_ROWS(MENNY_ACCUMULATE)
#undef MENNY_ACCUMULATE
  }
  const __m512 bias0 = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  const __m512 bias1 = bias ? _mm512_loadu_ps(bias + 16) : _mm512_setzero_ps();
#define MENNY_STORE(r)                                                      \
  if constexpr (ROWS > r) {                                                 \
    _mm512_storeu_ps(c + r * ldc, bias ? _mm512_add_ps(acc##r##a, bias0) : acc##r##a);      \
    _mm512_storeu_ps(c + r * ldc + 16, bias ? _mm512_add_ps(acc##r##b, bias1) : acc##r##b); \
  }
  MENNY_PANEL_ROWS(MENNY_STORE)
#undef MENNY_STORE
  finish_tile(c, ldc, ROWS, kPanelWidth, gelu, residual);
}
#undef MENNY_PANEL_ROWS

// panel_tile over `rows` rows of A (and of C and the residual), twelve at a time.
MENNY_AVX512 void panel_rows(const float* a, std::size_t lda, const float* panel, std::size_t depth, const float* bias,
                             bool gelu, const float* residual, float* c, std::size_t ldc, std::size_t rows) {
  over_row_tiles<12>(rows, [&]<int ROWS>(std::size_t row) {
    panel_tile<ROWS>(a + row * lda, lda, panel, depth, bias, gelu, residual ? residual + row * ldc : nullptr,
                     c + row * ldc, ldc);
  });
}

// folded[0 : depth] = the sum over i < rows of q[i] * w[i] (rows of w, depth floats each): a
// head's query taken through its rows of the key projection, so that its scores come straight
// from the audio features.  Eight 16-column chains at a time.
template <class W>
MENNY_AVX512 void fold_rows(const float* q, const W* w, std::size_t rows, std::size_t depth, float* folded) {
  std::size_t c = 0;
  for (; c + 128 <= depth; c += 128) {
#define MENNY_FOLD_CHAINS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define MENNY_DECLARE(j) __m512 acc##j = _mm512_setzero_ps();
    MENNY_FOLD_CHAINS(MENNY_DECLARE)
#undef MENNY_DECLARE
    for (std::size_t i = 0; i < rows; ++i) {
      const __m512 qi = _mm512_set1_ps(q[i]);
      const W* row = w + i * depth + c;
#define MENNY_ACCUMULATE(j) acc##j = _mm512_fmadd_ps(qi, load16(row + 16 * j), acc##j);
      MENNY_FOLD_CHAINS(MENNY_ACCUMULATE)
#undef MENNY_ACCUMULATE
    }
#define MENNY_STORE(j) _mm512_storeu_ps(folded + c + 16 * j, acc##j);
    MENNY_FOLD_CHAINS(MENNY_STORE)
#undef MENNY_STORE
#undef MENNY_FOLD_CHAINS
  }
  for (; c < depth; c += 16) {
    __m512 acc = _mm512_setzero_ps();
    for (std::size_t i = 0; i < rows; ++i) {
      acc = _mm512_fmadd_ps(_mm512_set1_ps(q[i]), load16(w + i * depth + c), acc);
    }
    _mm512_storeu_ps(folded + c, acc);
  }
}

// Panel p of w (n, depth) row-major as floats (float16 widened exactly): panel[k * 32 + j] =
// w[32 p + j, k].
template <class W>
MENNY_AVX512 void transpose_strip(const W* w, std::size_t depth, std::size_t p, float* panel) {
  alignas(64) float widened[16];
  const W* strip = w + p * kPanelWidth * depth;
  const std::size_t full = depth / 16 * 16;
  for (std::size_t k = 0; k < full; k += 16) {
    for (std::size_t j = 0; j < kPanelWidth; ++j) {
      _mm512_store_ps(widened, load16(strip + j * depth + k));
      for (std::size_t i = 0; i < 16; ++i) {
        panel[(k + i) * kPanelWidth + j] = widened[i];
      }
    }
  }
  for (std::size_t k = full; k < depth; ++k) {
    for (std::size_t j = 0; j < kPanelWidth; ++j) {
      if constexpr (std::is_same_v<W, float>) {
        panel[k * kPanelWidth + j] = strip[j * depth + k];
      } else {
        panel[k * kPanelWidth + j] = _cvtsh_ss(strip[j * depth + k]);
      }
    }
  }
}

// Columns [32 begin, 32 end) of out (rows, n) = x (rows, depth) @ w.T + bias (GELU'd, +
// residual, as asked) for w (n, depth) row-major: each 32-row strip of w packed once (64-256 KB,
// in the core's L2 cache) for all rows of x, so no copy of the weights is kept.  As fast as
// weights packed ahead of time, on the encoder's products too.
template <class W>
MENNY_AVX512 void strip_product(const float* x, const W* w, std::size_t depth, std::size_t n, std::size_t rows,
                                const float* bias, bool gelu, const float* residual, float* out, std::size_t begin,
                                std::size_t end) {
  thread_local std::vector<float> panel;
  panel.resize(depth * kPanelWidth);
  for (std::size_t p = begin; p < end; ++p) {
    transpose_strip(w, depth, p, panel.data());
    const std::size_t col = p * kPanelWidth;
    panel_rows(x, depth, panel.data(), depth, bias ? bias + col : nullptr, gelu,
               residual ? residual + col : nullptr, out + col, n, rows);
  }
}

template void fold_rows<float>(const float*, const float*, std::size_t, std::size_t, float*);
template void fold_rows<std::uint16_t>(const float*, const std::uint16_t*, std::size_t, std::size_t, float*);
template void strip_product<float>(const float*, const float*, std::size_t, std::size_t, std::size_t, const float*,
                                   bool, const float*, float*, std::size_t, std::size_t);
template void strip_product<std::uint16_t>(const float*, const std::uint16_t*, std::size_t, std::size_t, std::size_t,
                                           const float*, bool, const float*, float*, std::size_t, std::size_t);

}  // namespace menny
#endif
