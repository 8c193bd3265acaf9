// Matrix-vector products: a few rows of x times a weight matrix (float32 or float16) read once
// from memory, prefetched ahead, for a decoding step's projections.
#include <algorithm>

#include "simd.h"

#if defined(__x86_64__)
namespace menny {

// How far ahead of the weight rows being multiplied a matvec asks for the next ones.  The
// hardware prefetcher stops at every 4 KB page (these arrays get no huge pages), and a step's
// matrices come from DRAM (the vocabulary alone is larger than the L3 cache).
constexpr std::size_t kPrefetchBytes = 4096;

// out[j, r + i] = x[j] . w[r + i] (+ bias) for i < W_ROWS, j < X_ROWS: each weight is read from
// memory and widened once, then multiplied by every row of x (a decoding step's beams or
// samples: with one widening per product, five rows took twice one row's time).  One 8-lane
// chain of multiply-adds per pair of rows, summed across lanes at the end: the same products
// and sums whatever the tile, and for float32 and float16 weights (float16 weights holding the
// same values give the same bits).  Inlined into its caller, whose target sets how many
// registers the tile may hold (16 under AVX2, 32 under AVX-512's VL).
template <int W_ROWS, int X_ROWS, class W>
[[gnu::always_inline]] MENNY_AVX2 inline void matvec_tile(const float* x, const W* w, const float* bias,
                                                          std::size_t depth, float* out, std::size_t ld_out,
                                                          std::size_t r) {
  const std::size_t full = depth / 8 * 8;
  const W* w0 = w + r * depth;
  // The rows are contiguous: each step of 8 columns covers W_ROWS * 8 weights of them.
  const char* ahead = reinterpret_cast<const char*>(w0) + kPrefetchBytes;
  constexpr std::size_t kStepBytes = W_ROWS * 8 * sizeof(W);
  __m256 sums[W_ROWS][X_ROWS];
#pragma GCC unroll 8
  for (int i = 0; i < W_ROWS; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < X_ROWS; ++j) {
      sums[i][j] = _mm256_setzero_ps();
    }
  }
  for (std::size_t k = 0; k < full; k += 8) {
    if constexpr (kStepBytes >= 64) {
      for (std::size_t line = 0; line < kStepBytes; line += 64) {
        _mm_prefetch(ahead + k * W_ROWS * sizeof(W) + line, _MM_HINT_T0);
      }
    } else if (k % (64 / kStepBytes * 8) == 0) {
      _mm_prefetch(ahead + k * W_ROWS * sizeof(W), _MM_HINT_T0);
    }
    __m256 weights[W_ROWS];
#pragma GCC unroll 8
    for (int i = 0; i < W_ROWS; ++i) {
      weights[i] = load8(w0 + i * depth + k);
    }
#pragma GCC unroll 8
    for (int j = 0; j < X_ROWS; ++j) {
      const __m256 xv = _mm256_loadu_ps(x + j * depth + k);
#pragma GCC unroll 8
      for (int i = 0; i < W_ROWS; ++i) {
        sums[i][j] = _mm256_fmadd_ps(weights[i], xv, sums[i][j]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < W_ROWS; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < X_ROWS; ++j) {
      float sum = horizontal_sum(sums[i][j]);
      if (bias) {
        sum += bias[r + i];
      }
      for (std::size_t k = full; k < depth; ++k) {
        sum += load1(w0 + i * depth + k) * x[j * depth + k];
      }
      out[j * ld_out + r + i] = sum;
    }
  }
}

// Weight rows [begin, end) times X_ROWS rows of x, W_ROWS weight rows at a time.
template <int W_ROWS, int X_ROWS, class W>
[[gnu::always_inline]] MENNY_AVX2 inline void matvec_tiles(const float* x, const W* w, const float* bias,
                                                           std::size_t depth, float* out, std::size_t ld_out,
                                                           std::size_t begin, std::size_t end) {
  std::size_t r = begin;
  for (; r + W_ROWS <= end; r += W_ROWS) {
    matvec_tile<W_ROWS, X_ROWS>(x, w, bias, depth, out, ld_out, r);
  }
  for (; r < end; ++r) {
    matvec_tile<1, X_ROWS>(x, w, bias, depth, out, ld_out, r);
  }
}

// The rows ahead of a range's start were asked for by nobody (or by another thread).
template <class W>
[[gnu::always_inline]] MENNY_AVX2 inline void prefetch_start(const W* w, std::size_t depth, std::size_t begin) {
  const char* first = reinterpret_cast<const char*>(w + begin * depth);
  for (std::size_t line = 0; line < kPrefetchBytes; line += 64) {
    _mm_prefetch(first + line, _MM_HINT_T0);
  }
}

// The weight rows a tile of x_rows rows of x takes with 16 vector registers (AVX2) or 32 (AVX-512's
// VL): its x_rows sums per weight row and its widened weights fit, with room for the compiler (a
// tile that fills all 32 spilled, and ran at half speed).
constexpr int tile_weight_rows(int x_rows, int registers) {
  constexpr int with_16[] = {8, 4, 4, 3, 2, 2, 2, 1};
  constexpr int with_32[] = {8, 8, 6, 6, 5, 4, 3, 3};
  return (registers == 32 ? with_32 : with_16)[x_rows - 1];
}

// Weight rows [begin, end) times rows of x, up to eight at a time, in tiles for REGISTERS vector
// registers.
template <int REGISTERS, class W>
[[gnu::always_inline]] MENNY_AVX2 inline void matvec_rows(const float* x, std::size_t n_x, const W* w,
                                                          const float* bias, std::size_t depth, float* out,
                                                          std::size_t ld_out, std::size_t begin, std::size_t end) {
  prefetch_start(w, depth, begin);
  constexpr int R = REGISTERS;
  for (std::size_t j = 0; j < n_x; j += 8) {
    const float* xj = x + j * depth;
    float* oj = out + j * ld_out;
    switch (std::min<std::size_t>(n_x - j, 8)) {
      case 1: matvec_tiles<tile_weight_rows(1, R), 1>(xj, w, bias, depth, oj, ld_out, begin, end); break;
      case 2: matvec_tiles<tile_weight_rows(2, R), 2>(xj, w, bias, depth, oj, ld_out, begin, end); break;
      case 3: matvec_tiles<tile_weight_rows(3, R), 3>(xj, w, bias, depth, oj, ld_out, begin, end); break;
      case 4: matvec_tiles<tile_weight_rows(4, R), 4>(xj, w, bias, depth, oj, ld_out, begin, end); break;
      case 5: matvec_tiles<tile_weight_rows(5, R), 5>(xj, w, bias, depth, oj, ld_out, begin, end); break;
      case 6: matvec_tiles<tile_weight_rows(6, R), 6>(xj, w, bias, depth, oj, ld_out, begin, end); break;
      case 7: matvec_tiles<tile_weight_rows(7, R), 7>(xj, w, bias, depth, oj, ld_out, begin, end); break;
      default: matvec_tiles<tile_weight_rows(8, R), 8>(xj, w, bias, depth, oj, ld_out, begin, end); break;
    }
  }
}

template <class W>
MENNY_AVX2 void matvec_rows_avx2(const float* x, std::size_t n_x, const W* w, const float* bias, std::size_t depth,
                                 float* out, std::size_t ld_out, std::size_t begin, std::size_t end) {
  matvec_rows<16>(x, n_x, w, bias, depth, out, ld_out, begin, end);
}

// The same products with AVX-512's 32 vector registers (still 8-lane chains: the same bits).
template <class W>
MENNY_AVX512 void matvec_rows_avx512(const float* x, std::size_t n_x, const W* w, const float* bias,
                                     std::size_t depth, float* out, std::size_t ld_out, std::size_t begin,
                                     std::size_t end) {
  matvec_rows<32>(x, n_x, w, bias, depth, out, ld_out, begin, end);
}

void Matrix::times(const float* x, std::size_t n_x, const float* bias, std::size_t depth, float* out,
                   std::size_t ld_out, std::size_t begin, std::size_t end) const {
  with_weights([&](auto* w) {
    if (uses_avx512()) {
      matvec_rows_avx512(x, n_x, w, bias, depth, out, ld_out, begin, end);
    } else {
      matvec_rows_avx2(x, n_x, w, bias, depth, out, ld_out, begin, end);
    }
  });
}

}  // namespace menny
#endif
