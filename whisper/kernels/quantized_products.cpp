// Products of float32 rows and 8-bit weights, as `load_model(..., quantize=8)` leaves the
// encoder's linear layers: MLX's affine format in groups of 64 inputs (a weight is scale * q +
// bias, q in 0..255, four q to a uint32), read as it is.  Each row of x is quantized to int8 when
// the product starts (symmetric: x ~ s p, p = x / s rounded, s = max |x| / 127); each group's dot
// products of q and p are exact int32 sums, on AVX-512 VNNI (vpdpbusd: four unsigned weights times
// four signed x at a time) or on AVX2 (vpmaddwd on both widened to 16 bits); and a float epilogue
// per group applies the weights' scale to that sum and their bias to the sum of p there (exact
// too).  So the result is x's quantized values times the weights' values, exactly summed up to
// float rounding: the weights' bias (about the size of their largest value) then meets the same x
// as their scaled q, whose products it cancels; against x itself (tried first) it left x's
// rounding times that bias in every output, several times the error (bench/NOTES.md).  Exact
// integer sums and the same float operations in the same order: both paths give the same bits.
#include <cstring>
#include <memory>
#include <vector>

#include "primitives.h"
#include "simd.h"
#include "threads.h"

namespace menny {

// The weights' scales and biases are per group of this many inputs.
constexpr std::size_t kGroup = 64;
// A 32-bit lane holds four inputs' q: a group is this many lanes deep.
constexpr std::size_t kLanesPerGroup = kGroup / 4;
// A strip of the weights, packed at a time, holds this many outputs.
constexpr std::size_t kStripWidth = 64;
// Rows of x quantized at a time, handed out to threads.
constexpr std::size_t kQuantizedRowsPerBlock = 16;

#if defined(__x86_64__)
// x's rows as the integer products read them.
struct QuantizedRows {
  std::size_t depth;
  std::size_t groups;
  // Row r's p: int8 in order at r * depth (the AVX-512 product's), or int16 at r * depth with
  // each four inputs as x0 x2 x1 x3 (the AVX2 product's, see avx2_tile).
  const void* values;
  const float* scales;      // per row: s, the value of p = 1 (0 for a row of zeros)
  const float* group_sums;  // per row and group: the sum of p there (an integer)
};

// The weights of 64 outputs as the products read them (pack_strip).
struct PackedStrip {
  const std::uint32_t* q;
  const float* scales;
  const float* biases;
};

// Where the 64 outputs go: C from the strip's first column of row 0 on (rows ldc apart), the
// strip's bias and residual (rows ldc apart too) if any, and whether GELU comes before the latter.
struct StripOutput {
  float* c;
  std::size_t ldc;
  const float* bias;
  bool gelu;
  const float* residual;
};

inline std::int32_t four_bytes(const void* p) {
  std::int32_t lanes;
  std::memcpy(&lanes, p, sizeof(lanes));
  return lanes;
}

// acc += w's unsigned bytes times x's signed ones, four to each 32-bit lane (vpdpbusd), in
// place: GCC 12 copies each accumulator to another register and back around every
// _mm512_dpbusd_epi32, two moves per multiply-add.
MENNY_AVX512_VNNI inline void accumulate_dot4(__m512i& acc, __m512i w, __m512i x) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
}

// Row x (depth floats, a multiple of 64) as QuantizedRows holds it: p = x * (127 / max |x|)
// rounded to the nearest integer (ties to even), in [-127, 127]; int8 in order, or with WIDE int16
// with each four inputs as x0 x2 x1 x3.
template <bool WIDE>
MENNY_AVX2 void quantize_row(const float* x, std::size_t depth, void* values, float* scale, float* group_sums) {
  __m256 largest = _mm256_setzero_ps();
  for (std::size_t k = 0; k < depth; k += 8) {
    largest = _mm256_max_ps(largest, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_loadu_ps(x + k)));
  }
  const float top = horizontal_max(largest);
  *scale = top / 127.0f;
  const __m256 inverse = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
  for (std::size_t g = 0; g < depth / kGroup; ++g) {
    const float* in = x + g * kGroup;
    __m256i sum = _mm256_setzero_si256();
    __m256i v[kGroup / 8];
    for (std::size_t i = 0; i < kGroup / 8; ++i) {
      v[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(in + 8 * i), inverse),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      sum = _mm256_add_epi32(sum, v[i]);
    }
    group_sums[g] = horizontal_sum(_mm256_cvtepi32_ps(sum));
    if constexpr (WIDE) {
      auto* out = static_cast<std::int16_t*>(values) + g * kGroup;
      for (std::size_t i = 0; i < kGroup / 8; i += 2) {
        // Within each 128-bit lane x0 x1 x2 x3 -> x0 x2 x1 x3; then the two vectors' halves in order.
        const __m256i even_odd = _mm256_packs_epi32(_mm256_shuffle_epi32(v[i], _MM_SHUFFLE(3, 1, 2, 0)),
                                                    _mm256_shuffle_epi32(v[i + 1], _MM_SHUFFLE(3, 1, 2, 0)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * i),
                            _mm256_permute4x64_epi64(even_odd, _MM_SHUFFLE(3, 1, 2, 0)));
      }
    } else {
      auto* out = static_cast<std::int8_t*>(values) + g * kGroup;
      const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
      for (std::size_t i = 0; i < kGroup / 8; i += 4) {
        const __m256i bytes =
            _mm256_packs_epi16(_mm256_packs_epi32(v[i], v[i + 1]), _mm256_packs_epi32(v[i + 2], v[i + 3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * i), _mm256_permutevar8x32_epi32(bytes, order));
      }
    }
  }
}

// Strip p of the weights (n, depth / 4), 64 outputs, as the products read it: q[k * 64 + j] =
// w[64 p + j, k], output 64 p + j's four weights of inputs 4 k to 4 k + 3; group g's scales and
// biases of the 64 outputs at 64 g.  Into the core's cache, for all rows of x.
MENNY_AVX2 void pack_strip(const std::uint32_t* w, const float* scales, const float* biases, std::size_t depth,
                           std::size_t p, std::uint32_t* q, float* strip_scales, float* strip_biases) {
  const std::size_t lanes = depth / 4, groups = depth / kGroup;
  const std::uint32_t* strip = w + p * kStripWidth * lanes;
  const __m256i rows = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                          _mm256_set1_epi32(static_cast<int>(lanes)));
  for (std::size_t k = 0; k < lanes; ++k) {
    for (std::size_t j = 0; j < kStripWidth; j += 8) {
      const auto* column = reinterpret_cast<const int*>(strip + j * lanes + k);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k * kStripWidth + j),
                          _mm256_i32gather_epi32(column, rows, 4));
    }
  }
  for (std::size_t g = 0; g < groups; ++g) {
    for (std::size_t j = 0; j < kStripWidth; ++j) {
      strip_scales[g * kStripWidth + j] = scales[(p * kStripWidth + j) * groups + g];
      strip_biases[g * kStripWidth + j] = biases[(p * kStripWidth + j) * groups + g];
    }
  }
}

// C[ROWS x 64] = rows [row, row + ROWS) of x (ROWS <= 3) times a packed strip, plus the bias,
// GELU'd if asked, plus the residual if given (rows [row, row + ROWS) of the output's).  Per
// group: 4 * ROWS int32 accumulators of vpdpbusd, then into 4 * ROWS float ones: the weights'
// scale times the sum, plus their bias times the group's sum of p; at the end the row's scale.  Four
// loads of the strip and ROWS broadcasts of x per 4 * ROWS vpdpbusd: with a broadcast per two
// (32 outputs, 6 rows), the broadcasts held this core to two thirds of its vpdpbusd rate.
#define MENNY_TILE_ROWS(X) X(0) X(1) X(2)
#define MENNY_TILE_COLUMNS(X, r) X(r, 0) X(r, 1) X(r, 2) X(r, 3)
template <int ROWS>
MENNY_AVX512_VNNI void vnni_tile(const QuantizedRows& x, std::size_t row, const PackedStrip& strip,
                                 const StripOutput& out) {
  const std::size_t depth = x.depth, groups = x.groups, ldc = out.ldc;
  float* c = out.c + row * ldc;
  const std::int8_t* values = static_cast<const std::int8_t*>(x.values) + row * depth;
  // The float accumulators: the compiler keeps them in registers, beside the integer ones.
  alignas(64) float f[ROWS][kStripWidth] = {};
  for (std::size_t g = 0; g < groups; ++g) {
#define MENNY_DECLARE(r, j) __m512i s##r##j = _mm512_setzero_si512();
#define MENNY_DECLARE_ROW(r) MENNY_TILE_COLUMNS(MENNY_DECLARE, r)
    MENNY_TILE_ROWS(MENNY_DECLARE_ROW)
#undef MENNY_DECLARE_ROW
#undef MENNY_DECLARE
    const std::uint32_t* w = strip.q + g * kLanesPerGroup * kStripWidth;
    const std::int8_t* xg = values + g * kGroup;
    for (std::size_t k = 0; k < kLanesPerGroup; ++k, w += kStripWidth) {
      // The rows' broadcasts first, then each column's load for all rows: in the other order GCC
      // ran out of registers and loaded the strip again for every row.
#define MENNY_BROADCAST(r) \
  const __m512i x##r = ROWS > r ? _mm512_set1_epi32(four_bytes(xg + r * depth + 4 * k)) : _mm512_setzero_si512();
      MENNY_TILE_ROWS(MENNY_BROADCAST)
#undef MENNY_BROADCAST
#define MENNY_DOT(r, j)                   \
  if constexpr (ROWS > r) {               \
    accumulate_dot4(s##r##j, wj, x##r);   \
  }
#define MENNY_COLUMN(j)                                \
  {                                                    \
    const __m512i wj = _mm512_loadu_si512(w + 16 * j); \
    MENNY_DOT(0, j) MENNY_DOT(1, j) MENNY_DOT(2, j)    \
  }
      MENNY_COLUMN(0) MENNY_COLUMN(1) MENNY_COLUMN(2) MENNY_COLUMN(3)
#undef MENNY_COLUMN
#undef MENNY_DOT
    }
    const float* scales = strip.scales + g * kStripWidth;
    const float* biases = strip.biases + g * kStripWidth;
#define MENNY_SCALE(r, j)                                                                                    \
  _mm512_store_ps(f[r] + 16 * j,                                                                             \
                  _mm512_fmadd_ps(_mm512_loadu_ps(biases + 16 * j), sum,                                     \
                                  _mm512_fmadd_ps(_mm512_cvtepi32_ps(s##r##j), _mm512_loadu_ps(scales + 16 * j), \
                                                  _mm512_load_ps(f[r] + 16 * j))));
#define MENNY_EPILOGUE(r)                                                    \
  if constexpr (ROWS > r) {                                                  \
    const __m512 sum = _mm512_set1_ps(x.group_sums[(row + r) * groups + g]); \
    MENNY_TILE_COLUMNS(MENNY_SCALE, r)                                       \
  }
    MENNY_TILE_ROWS(MENNY_EPILOGUE)
#undef MENNY_EPILOGUE
#undef MENNY_SCALE
  }
#define MENNY_STORE_COLUMN(r, j)                                                                   \
  _mm512_storeu_ps(c + r * ldc + 16 * j,                                                           \
                   _mm512_fmadd_ps(_mm512_load_ps(f[r] + 16 * j), scale,                           \
                                   out.bias ? _mm512_loadu_ps(out.bias + 16 * j) : _mm512_setzero_ps()));
#define MENNY_STORE(r)                                      \
  if constexpr (ROWS > r) {                                 \
    const __m512 scale = _mm512_set1_ps(x.scales[row + r]); \
    MENNY_TILE_COLUMNS(MENNY_STORE_COLUMN, r)               \
  }
  MENNY_TILE_ROWS(MENNY_STORE)
#undef MENNY_STORE
#undef MENNY_STORE_COLUMN
  finish_tile(c, ldc, ROWS, kStripWidth, out.gelu, out.residual ? out.residual + row * ldc : nullptr);
}
#undef MENNY_TILE_COLUMNS
#undef MENNY_TILE_ROWS

// vnni_tile's C with AVX2 (ROWS <= 3), 16 outputs at a time: a uint32 of four weights w0..w3
// splits into 16-bit lanes (w0, w2) (its even bytes) and (w1, w3) (its odd ones), and x's row
// holds each four inputs as (x0, x2), (x1, x3): two vpmaddwd give w0 x0 + w2 x2 and w1 x1 + w3 x3,
// exact (no 16-bit sum saturates, unlike vpmaddubsw's).  The float accumulators stay in memory
// (16 registers hold the integer ones); the same float operations per output as vnni_tile's.
#define MENNY_TILE_ROWS(X) X(0) X(1) X(2)
template <int ROWS>
MENNY_AVX2 void avx2_tile(const QuantizedRows& x, std::size_t row, const PackedStrip& strip, const StripOutput& out) {
  const std::size_t depth = x.depth, groups = x.groups, ldc = out.ldc;
  float* c = out.c + row * ldc;
  const std::int16_t* values = static_cast<const std::int16_t*>(x.values) + row * depth;
  const __m256i even_bytes = _mm256_set1_epi16(0x00FF);
  alignas(32) float f[ROWS][kStripWidth] = {};
  for (std::size_t g = 0; g < groups; ++g) {
    const std::int16_t* xg = values + g * kGroup;
    for (std::size_t first = 0; first < kStripWidth; first += 16) {
#define MENNY_DECLARE(r) __m256i s##r##a = _mm256_setzero_si256(), s##r##b = _mm256_setzero_si256();
      MENNY_TILE_ROWS(MENNY_DECLARE)
#undef MENNY_DECLARE
      const std::uint32_t* w = strip.q + g * kLanesPerGroup * kStripWidth + first;
      for (std::size_t k = 0; k < kLanesPerGroup; ++k, w += kStripWidth) {
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 8));
        const __m256i even0 = _mm256_and_si256(w0, even_bytes), odd0 = _mm256_srli_epi16(w0, 8);
        const __m256i even1 = _mm256_and_si256(w1, even_bytes), odd1 = _mm256_srli_epi16(w1, 8);
#define MENNY_ACCUMULATE(r)                                                                \
  if constexpr (ROWS > r) {                                                                \
    const __m256i x_even = _mm256_set1_epi32(four_bytes(xg + r * depth + 4 * k));          \
    const __m256i x_odd = _mm256_set1_epi32(four_bytes(xg + r * depth + 4 * k + 2));       \
    s##r##a = _mm256_add_epi32(s##r##a, _mm256_add_epi32(_mm256_madd_epi16(even0, x_even), \
                                                         _mm256_madd_epi16(odd0, x_odd))); \
    s##r##b = _mm256_add_epi32(s##r##b, _mm256_add_epi32(_mm256_madd_epi16(even1, x_even), \
                                                         _mm256_madd_epi16(odd1, x_odd))); \
  }
        MENNY_TILE_ROWS(MENNY_ACCUMULATE)
#undef MENNY_ACCUMULATE
      }
      const float* scales = strip.scales + g * kStripWidth + first;
      const float* biases = strip.biases + g * kStripWidth + first;
#define MENNY_EPILOGUE(r)                                                                         \
  if constexpr (ROWS > r) {                                                                       \
    const __m256 sum = _mm256_set1_ps(x.group_sums[(row + r) * groups + g]);                      \
    __m256 fa = _mm256_load_ps(f[r] + first), fb = _mm256_load_ps(f[r] + first + 8);              \
    fa = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s##r##a), _mm256_loadu_ps(scales), fa);              \
    fa = _mm256_fmadd_ps(_mm256_loadu_ps(biases), sum, fa);                                      \
    fb = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s##r##b), _mm256_loadu_ps(scales + 8), fb);          \
    fb = _mm256_fmadd_ps(_mm256_loadu_ps(biases + 8), sum, fb);                                  \
    _mm256_store_ps(f[r] + first, fa);                                                            \
    _mm256_store_ps(f[r] + first + 8, fb);                                                        \
  }
      MENNY_TILE_ROWS(MENNY_EPILOGUE)
#undef MENNY_EPILOGUE
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    const __m256 scale = _mm256_set1_ps(x.scales[row + r]);
    for (std::size_t j = 0; j < kStripWidth; j += 8) {
      const __m256 bias = out.bias ? _mm256_loadu_ps(out.bias + j) : _mm256_setzero_ps();
      _mm256_storeu_ps(c + r * ldc + j, _mm256_fmadd_ps(_mm256_load_ps(f[r] + j), scale, bias));
    }
  }
  finish_tile(c, ldc, ROWS, kStripWidth, out.gelu, out.residual ? out.residual + row * ldc : nullptr);
}
#undef MENNY_TILE_ROWS

// Columns [64 begin, 64 end) of out (rows, n) = x @ w.T + bias (GELU'd, + residual, as asked):
// each strip of 64 outputs packed once, into the core's cache, for all rows of x; no packed copy
// of the weights is kept.
void quantized_strips(const QuantizedRows& x, std::size_t rows, const std::uint32_t* w, const float* scales,
                      const float* biases, std::size_t n, const float* bias, bool gelu, const float* residual,
                      float* out, std::size_t begin, std::size_t end) {
  thread_local std::vector<std::uint32_t> packed;
  thread_local std::vector<float> packed_groups;
  packed.resize(x.depth / 4 * kStripWidth);
  packed_groups.resize(2 * x.groups * kStripWidth);
  const PackedStrip strip{packed.data(), packed_groups.data(), packed_groups.data() + x.groups * kStripWidth};
  for (std::size_t p = begin; p < end; ++p) {
    pack_strip(w, scales, biases, x.depth, p, packed.data(), packed_groups.data(),
               packed_groups.data() + x.groups * kStripWidth);
    const std::size_t col = p * kStripWidth;
    const StripOutput output{out + col, n, bias ? bias + col : nullptr, gelu, residual ? residual + col : nullptr};
    if (uses_avx512_vnni()) {
      over_row_tiles<3>(rows, [&]<int ROWS>(std::size_t row) { vnni_tile<ROWS>(x, row, strip, output); });
    } else {
      over_row_tiles<3>(rows, [&]<int ROWS>(std::size_t row) { avx2_tile<ROWS>(x, row, strip, output); });
    }
  }
}

// out (rows, n) = x (rows, depth) @ the weights.T + bias, GELU'd and + residual as asked, on
// every core: first x's rows quantized, then the strips of 64 outputs.
void quantized_product_rows(const float* x, std::size_t rows, std::size_t depth, const std::uint32_t* w,
                            const float* scales, const float* biases, std::size_t n, const float* bias, bool gelu,
                            const float* residual, float* out) {
  const bool wide = !uses_avx512_vnni();
  const std::size_t groups = depth / kGroup;
  const std::size_t bytes_per_row = depth * (wide ? sizeof(std::int16_t) : sizeof(std::int8_t));
  const auto values = std::make_unique_for_overwrite<char[]>(rows * bytes_per_row);
  std::vector<float> row_data(rows * (1 + groups));
  float* row_scales = row_data.data();
  float* group_sums = row_scales + rows;
  const QuantizedRows quantized{depth, groups, values.get(), row_scales, group_sums};
  const auto quantize = wide ? quantize_row<true> : quantize_row<false>;
  auto pipeline = std::make_shared<Pipeline>();
  pipeline->add(rows, kQuantizedRowsPerBlock, [=, values = values.get()](std::size_t begin, std::size_t end) {
    for (std::size_t r = begin; r < end; ++r) {
      quantize(x + r * depth, depth, values + r * bytes_per_row, row_scales + r, group_sums + r * groups);
    }
  });
  pipeline->add(n / kStripWidth, 1, [=](std::size_t begin, std::size_t end) {
    quantized_strips(quantized, rows, w, scales, biases, n, bias, gelu, residual, out, begin, end);
  });
  Pipeline::run(pipeline);
}
#endif

// x (..., depth) @ the 8-bit weights.T + bias, then GELU and + residual as asked; inputs x, the
// weights (n, depth / 4) uint32, their scales and biases (n, depth / 64) float32, then the bias
// and the residual if any.
class MennyQuantizedProduct : public ProductWithEpilogue<MennyQuantizedProduct> {
 public:
  using ProductWithEpilogue::ProductWithEpilogue;

  const char* name() const override {
    return "MennyQuantizedProduct";
  }

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = fresh_output(inputs, out);
#if defined(__x86_64__)
    const std::optional<mx::array> bias = this->bias(inputs, 4);
    const std::optional<mx::array> residual = this->residual(inputs);
    encoder.dispatch([x = inputs[0], given = std::vector(inputs.begin() + 1, inputs.begin() + 4), bias, residual,
                      gelu = gelu_, out]() mutable {
      // The weights come as they are (a contiguous() node would copy a view every call).
      std::vector<mx::array> weights;
      for (const mx::array& a : given) {
        weights.push_back(in_row_order(a) ? a : copy_in_row_order(a));
      }
      const std::size_t depth = x.shape(-1);
      quantized_product_rows(x.data<float>(), x.size() / depth, depth, weights[0].data<std::uint32_t>(),
                             weights[1].data<float>(), weights[2].data<float>(), out.shape(-1),
                             bias ? bias->data<float>() : nullptr, gelu, residual ? residual->data<float>() : nullptr,
                             out.data<float>());
    });
#endif
  }

};

mx::array quantized_product(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
                            const std::optional<mx::array>& bias, const std::optional<mx::array>& residual,
                            bool gelu) {
  const int depth = x.ndim() < 1 ? 0 : x.shape(-1);
  if (x.dtype() != mx::float32 || depth == 0 || depth % kGroup != 0 || w.ndim() != 2 || w.dtype() != mx::uint32 ||
      w.shape(0) % kStripWidth != 0 || w.shape(1) * 4 != depth) {
    throw std::invalid_argument("expected float32 x (..., depth), depth a multiple of 64, and 8-bit weights (n, "
                                "depth / 4) uint32, n a multiple of 64");
  }
  const mx::Shape groups{w.shape(0), depth / static_cast<int>(kGroup)};
  if (scales.shape() != groups || biases.shape() != groups || !mx::issubdtype(scales.dtype(), mx::floating) ||
      !mx::issubdtype(biases.dtype(), mx::floating)) {
    throw std::invalid_argument("expected the weights' scales and biases (n, depth / 64): 8 bits in groups of 64");
  }
  const mx::Stream stream = cpu_stream();
  mx::Shape shape = x.shape();
  shape.back() = w.shape(0);
  if (bias && bias->shape() != mx::Shape{shape.back()}) {
    throw std::invalid_argument("expected a bias (n,)");
  }
  if (residual && residual->shape() != shape) {
    throw std::invalid_argument("expected a residual of the result's shape");
  }
  std::vector<mx::array> inputs{float32_rows(x, stream), w, float32_rows(scales, stream),
                                float32_rows(biases, stream)};
  if (bias) {
    inputs.push_back(float32_rows(*bias, stream));
  }
  if (residual) {
    inputs.push_back(float32_rows(*residual, stream));
  }
  return mx::array(shape, mx::float32,
                   std::make_shared<MennyQuantizedProduct>(stream, bias.has_value(), gelu, residual.has_value()),
                   std::move(inputs));
}

}  // namespace menny
