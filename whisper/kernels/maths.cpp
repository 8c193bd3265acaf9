// Element-wise and row-wise maths: which SIMD kernels this CPU runs, a row's exponentials
// (softmax), exact GELU, and layer norm with MLX's bits.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "simd.h"

namespace menny {

#if defined(__x86_64__)
bool uses_avx2() {
  static const bool avx2 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return avx2;
}

bool uses_avx512() {
  static const bool avx512 = [] {
    const char* avx2_only = std::getenv("MENNY_KERNELS_AVX2_ONLY");
    if (avx2_only && std::strcmp(avx2_only, "1") == 0) {
      return false;
    }
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && uses_avx2();
  }();
  return avx512;
}

bool uses_avx512_vnni() {
  static const bool vnni =
      uses_avx512() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
  return vnni;
}

// out = e^(scale * (in - max(in))) for one row (scale > 0; in place is fine); returns the sum.
MENNY_AVX2 float exp_row_avx2(const float* in, float* out, std::size_t n, float scale) {
  const std::size_t full = n / 8 * 8;
  const __m256i mask = tail_mask(n - full);
  const __m256 minus_inf = _mm256_set1_ps(-INFINITY);
  const __m256 zero = _mm256_setzero_ps();
  __m256 vmax = minus_inf;
  for (std::size_t i = 0; i < full; i += 8) {
    vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(in + i));
  }
  if (full < n) {
    const __m256 x = _mm256_blendv_ps(minus_inf, _mm256_maskload_ps(in + full, mask), _mm256_castsi256_ps(mask));
    vmax = _mm256_max_ps(vmax, x);
  }
  const __m256 maximum = _mm256_set1_ps(horizontal_max(vmax));
  const __m256 vscale = _mm256_set1_ps(scale);
  __m256 vsum = zero;
  for (std::size_t i = 0; i < full; i += 8) {
    const __m256 e = exp_below_88<false>(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(in + i), maximum), vscale), zero);
    _mm256_storeu_ps(out + i, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  if (full < n) {
    __m256 e = exp_below_88<false>(_mm256_mul_ps(_mm256_sub_ps(_mm256_maskload_ps(in + full, mask), maximum), vscale), zero);
    e = _mm256_and_ps(e, _mm256_castsi256_ps(mask));
    _mm256_maskstore_ps(out + full, mask, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  return horizontal_sum(vsum);
}

MENNY_AVX2 void softmax_rows_avx2(const float* in, float* out, std::size_t rows, std::size_t n) {
  const std::size_t full = n / 8 * 8;
  const __m256i mask = tail_mask(n - full);
  for (std::size_t row = 0; row < rows; ++row, in += n, out += n) {
    const __m256 inverse = _mm256_set1_ps(1.0f / exp_row_avx2(in, out, n, 1.0f));
    for (std::size_t i = 0; i < full; i += 8) {
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(out + i), inverse));
    }
    if (full < n) {
      _mm256_maskstore_ps(out + full, mask, _mm256_mul_ps(_mm256_maskload_ps(out + full, mask), inverse));
    }
  }
}

MENNY_AVX2 void gelu_avx2(const float* in, float* out, std::size_t n) {
  const std::size_t full = n / 8 * 8;
  for (std::size_t i = 0; i < full; i += 8) {
    _mm256_storeu_ps(out + i, gelu8(_mm256_loadu_ps(in + i)));
  }
  if (full < n) {
    const __m256i mask = tail_mask(n - full);
    _mm256_maskstore_ps(out + full, mask, gelu8(_mm256_maskload_ps(in + full, mask)));
  }
}
#else
bool uses_avx2() {
  return false;
}

bool uses_avx512() {
  return false;
}

bool uses_avx512_vnni() {
  return false;
}
#endif

// Layer norm of `rows` rows of n values, computed as MLX computes it on a CPU (its fallback
// ops: float32 running sums from the first value on, mean and variance multiplied by 1/n,
// 1 / sqrt, then the weight and the bias, each product and sum rounded): the same bits as
// mx.fast.layer_norm.  Eight rows at a time, so that eight running sums are in flight instead
// of one waiting on each addition.  Baseline x86-64 code, so the compiler may neither fuse a
// multiply and an add nor reorder a sum.
void layer_norm_rows(const float* x, const float* weight, const float* bias, float* out, std::size_t rows,
                     std::size_t n, float eps) {
  constexpr std::size_t kGroup = 8;
  const float inverse_n = static_cast<float>(1.0 / static_cast<double>(n));
  for (std::size_t first = 0; first < rows; first += kGroup) {
    const std::size_t group = std::min(kGroup, rows - first);
    const float* in = x + first * n;
    float mean[kGroup] = {}, inverse_deviation[kGroup] = {};
    for (std::size_t i = 0; i < n; ++i) {
      for (std::size_t r = 0; r < group; ++r) {
        mean[r] += in[r * n + i];
      }
    }
    for (std::size_t r = 0; r < group; ++r) {
      mean[r] *= inverse_n;
    }
    for (std::size_t i = 0; i < n; ++i) {
      for (std::size_t r = 0; r < group; ++r) {
        const float centred = in[r * n + i] - mean[r];
        inverse_deviation[r] += centred * centred;
      }
    }
    for (std::size_t r = 0; r < group; ++r) {
      inverse_deviation[r] = 1.0f / std::sqrt(inverse_deviation[r] * inverse_n + eps);
      float* dst = out + (first + r) * n;
      for (std::size_t i = 0; i < n; ++i) {
        const float normal = (in[r * n + i] - mean[r]) * inverse_deviation[r];
        const float scaled = normal * weight[i];
        dst[i] = scaled + bias[i];
      }
    }
  }
}

}  // namespace menny
