// Matrix-vector products: a few rows of x times a weight matrix (float32 or float16) read once
// from memory, prefetched ahead, for a decoding step's projections.
#include "simd.h"

#if defined(__x86_64__)
namespace menny {

// How far ahead of the weight rows being multiplied a matvec asks for the next ones.  The
// hardware prefetcher stops at every 4 KB page (these arrays get no huge pages), and a step's
// matrices come from DRAM (the vocabulary alone is larger than the L3 cache).
constexpr std::size_t kPrefetchBytes = 4096;

// out[j, r + i] = x[j] . w[r + i] (+ bias) for i < ROWS: each row of w read from memory once,
// then from L1 for every row of x.  One 8-lane chain of multiply-adds per row of w, summed
// across lanes at the end: the same products and sums whatever ROWS, and for float32 and
// float16 weights (float16 weights holding the same values give the same bits).  Eight rows
// give eight independent chains, enough to hide the multiply-add and F16C latencies.
#define MENNY_MATVEC_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
template <int ROWS, class W>
MENNY_AVX2 inline void matvec_group(const float* x, std::size_t n_x, const W* w, const float* bias,
                                    std::size_t depth, float* out, std::size_t ld_out, std::size_t r) {
  const std::size_t full = depth / 8 * 8;
  const W* w0 = w + r * depth;
  // The ROWS rows are contiguous: each step of 8 columns covers ROWS * 8 weights of them.
  const char* ahead = reinterpret_cast<const char*>(w0) + kPrefetchBytes;
  constexpr std::size_t kStepBytes = ROWS * 8 * sizeof(W);
  for (std::size_t j = 0; j < n_x; ++j) {
    const float* xj = x + j * depth;
#define MENNY_DECLARE(i) __m256 a##i = _mm256_setzero_ps();
    MENNY_MATVEC_ROWS(MENNY_DECLARE)
#undef MENNY_DECLARE
    for (std::size_t k = 0; k < full; k += 8) {
      if constexpr (kStepBytes >= 64) {
        for (std::size_t line = 0; line < kStepBytes; line += 64) {
          _mm_prefetch(ahead + k * ROWS * sizeof(W) + line, _MM_HINT_T0);
        }
      }
      const __m256 xv = _mm256_loadu_ps(xj + k);
#define MENNY_ACCUMULATE(i)                                            \
  if constexpr (ROWS > i) {                                            \
    a##i = _mm256_fmadd_ps(load8(w0 + i * depth + k), xv, a##i);       \
  }
      MENNY_MATVEC_ROWS(MENNY_ACCUMULATE)
#undef MENNY_ACCUMULATE
    }
#define MENNY_STORE(i)                                                 \
  if constexpr (ROWS > i) {                                            \
    float sum = horizontal_sum(a##i);                                  \
    if (bias) {                                                        \
      sum += bias[r + i];                                              \
    }                                                                  \
    for (std::size_t k = full; k < depth; ++k) {                       \
      sum += load1(w0 + i * depth + k) * xj[k];                        \
    }                                                                  \
    out[j * ld_out + r + i] = sum;                                     \
  }
    MENNY_MATVEC_ROWS(MENNY_STORE)
#undef MENNY_STORE
  }
}
#undef MENNY_MATVEC_ROWS

// matvec_group over w rows [begin, end); row j of the result starts at out + j * ld_out.
template <class W>
MENNY_AVX2 void matvec_rows_avx2(const float* x, std::size_t n_x, const W* w, const float* bias, std::size_t depth,
                                 float* out, std::size_t ld_out, std::size_t begin, std::size_t end) {
  // The rows ahead of a range's start were asked for by nobody (or by another thread).
  const char* first = reinterpret_cast<const char*>(w + begin * depth);
  for (std::size_t line = 0; line < kPrefetchBytes; line += 64) {
    _mm_prefetch(first + line, _MM_HINT_T0);
  }
  std::size_t r = begin;
  for (; r + 8 <= end; r += 8) {
    matvec_group<8>(x, n_x, w, bias, depth, out, ld_out, r);
  }
  for (; r < end; ++r) {
    matvec_group<1>(x, n_x, w, bias, depth, out, ld_out, r);
  }
}

void Matrix::times(const float* x, std::size_t n_x, const float* bias, std::size_t depth, float* out,
                   std::size_t ld_out, std::size_t begin, std::size_t end) const {
  with_weights([&](auto* w) { matvec_rows_avx2(x, n_x, w, bias, depth, out, ld_out, begin, end); });
}

}  // namespace menny
#endif
