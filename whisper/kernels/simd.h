// SIMD maths: the inline AVX2 and AVX-512 pieces the kernels are built from (exp, GELU, loads of
// float16 or float32 weights, sums across lanes).
//
// Numerics: computed in float32.  exp is a range reduction plus a degree-5 polynomial (error
// ~2e-10 before rounding), erfc a fitted polynomial in t = 2 / (2 + z) under an exp (relative
// error < 4e-7 in float32): as accurate as MLX's own ops, and for GELU's negative tail far more.
#pragma once

#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <utility>

namespace menny {

// e^(hi + lo) for |lo| << |hi| (the split lets erfc pass -z^2 exactly as a float pair; without
// kLow, lo is taken as 0) and hi + lo < 88.7: every caller's is at most 0 (a softmax's shifted
// scores, erfc's exponent), so overflow is not handled.  Results below FLT_MIN are flushed to 0;
// NaN stays NaN.
template <bool kLow>
MENNY_AVX2 inline __m256 exp_below_88(__m256 hi, __m256 lo) {
  const __m256 arg = kLow ? _mm256_add_ps(hi, lo) : hi;
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(_mm256_max_ps(arg, _mm256_set1_ps(-88.0f)),
                                                 _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln 2 in two parts: n * 0.693359375 is exact for |n| < 2^15.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), hi);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  if constexpr (kLow) {
    r = _mm256_add_ps(r, lo);
  }
  // e^r = 1 + r + r^2 q(r) on |r| <= ln(2) / 2, q fitted by Chebyshev least squares.
  __m256 q = _mm256_set1_ps(1.9899280e-4f);
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.3933651e-3f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(8.3332985e-3f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(4.1666465e-2f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.6666667e-1f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(5.0000000e-1f));
  const __m256 p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(r, r), q, r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_andnot_ps(_mm256_cmp_ps(arg, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ), result);
}

MENNY_AVX2 inline __m256i tail_mask(std::size_t remaining) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(remaining)), lanes);
}

MENNY_AVX2 inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

MENNY_AVX2 inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// x * Phi(x) with Phi from erfc(z), z = |x| / sqrt(2):  erfc(z) = t * e^(-z^2 + P(t)),
// t = 2 / (2 + z), P a degree-10 Chebyshev least-squares fit in u = 2.4 t - 1.4 (t over
// [1/6, 1], i.e. z <= 10; beyond, erfc is below float range anyway).  z^2 = x^2 / 2 is kept
// exact as a float pair: rounding it would cost ~1e-7 * z^2 relative error in the tail.
MENNY_AVX2 inline __m256 gelu8(__m256 x) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  const __m256 a = _mm256_min_ps(_mm256_andnot_ps(sign_bit, x), _mm256_set1_ps(14.0f));
  const __m256 z = _mm256_mul_ps(a, _mm256_set1_ps(0.70710678118654752f));
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(z, _mm256_set1_ps(2.0f)));
  const __m256 u = _mm256_fmadd_ps(t, _mm256_set1_ps(2.4f), _mm256_set1_ps(-1.4f));
  __m256 p = _mm256_set1_ps(-2.0848480e-05f);
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(5.5786346e-05f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(1.2507163e-04f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(-5.3624128e-04f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(-2.7197215e-04f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(3.7087894e-03f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(-1.0468961e-03f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(-2.9470664e-02f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(1.5745232e-02f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(5.7030714e-01f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(-5.5859536e-01f));
  // -z^2 as the exact pair (-zz, -zz_low).
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 aa = _mm256_mul_ps(a, a);
  const __m256 zz = _mm256_mul_ps(aa, half);
  const __m256 zz_low = _mm256_mul_ps(_mm256_fmsub_ps(a, a, aa), half);
  const __m256 half_erfc = _mm256_mul_ps(
      _mm256_mul_ps(t, half), exp_below_88<true>(_mm256_xor_ps(zz, sign_bit), _mm256_sub_ps(p, zz_low)));
  const __m256 negative = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
  const __m256 phi = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), half_erfc), half_erfc, negative);
  return _mm256_mul_ps(x, phi);
}

// A product's tile of `rows` rows of `cols` outputs (a multiple of 8; rows ldc apart), as stored:
// exact GELU if asked, then plus the residual (rows ldc apart too) if given.  The same operations
// as the separate GELU kernel and MLX's add after the product, so the same bits.
MENNY_AVX2 inline void finish_tile(float* c, std::size_t ldc, std::size_t rows, std::size_t cols, bool gelu,
                                   const float* residual) {
  for (std::size_t r = 0; r < rows && (gelu || residual); ++r) {
    float* row = c + r * ldc;
    for (std::size_t j = 0; j < cols; j += 8) {
      __m256 y = _mm256_loadu_ps(row + j);
      if (gelu) {
        y = gelu8(y);
      }
      if (residual) {
        y = _mm256_add_ps(_mm256_loadu_ps(residual + r * ldc + j), y);
      }
      _mm256_storeu_ps(row + j, y);
    }
  }
}

// tile.template operator()<ROWS>(first row) over rows [0, rows): register tiles of MAX rows, then
// the rows left as one smaller tile.
template <int MAX, class Tile>
inline void over_row_tiles(std::size_t rows, Tile&& tile) {
  std::size_t row = 0;
  for (; row + MAX <= rows; row += MAX) {
    tile.template operator()<MAX>(row);
  }
  [&]<int... R>(std::integer_sequence<int, R...>) {
    ((rows - row == R + 1 ? tile.template operator()<R + 1>(row) : void()), ...);
  }(std::make_integer_sequence<int, MAX - 1>{});
}

// Eight weights as floats: float32 as they are, float16 (raw bits) widened exactly.
MENNY_AVX2 inline __m256 load8(const float* p) {
  return _mm256_loadu_ps(p);
}
MENNY_AVX2 inline __m256 load8(const std::uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
MENNY_AVX2 inline float load1(const float* p) {
  return *p;
}
MENNY_AVX2 inline float load1(const std::uint16_t* p) {
  return _cvtsh_ss(*p);
}

// Sixteen weights as floats: float16 (raw bits) widened exactly, float32 as they are.
MENNY_AVX512 inline __m512 load16(const std::uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
MENNY_AVX512 inline __m512 load16(const float* p) {
  return _mm512_loadu_ps(p);
}

}  // namespace menny
#endif
