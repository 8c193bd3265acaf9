// Attention: a fused multi-head attention over keys and values (the encoder's, a prompt's, a
// decoding step's over its key cache, causal there), built on AVX2 register tiles; the scores of
// a block of queries never leave the core's cache.
#include <algorithm>
#include <vector>

#include "simd.h"
#include "threads.h"

#if defined(__x86_64__)
namespace menny {

// C[ROWS x 16] = A[ROWS x depth] * B[depth x 16], row r of C scaled by row_scale[r] if given.
// The register tile of an AVX2 matrix product: 2 * ROWS accumulators (ROWS <= 6 fits the 16
// ymm registers), one broadcast of A and two loads of B per 2 * ROWS multiply-adds.  Named
// accumulators, not an array: GCC keeps an array of them in memory, storing every iteration.
#define MENNY_TILE_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
template <int ROWS>
MENNY_AVX2 inline void tile16(const float* a, std::size_t lda, const float* b, std::size_t ldb, float* c,
                              std::size_t ldc, std::size_t depth, const float* row_scale) {
#define MENNY_DECLARE(r) __m256 acc##r##a = _mm256_setzero_ps(), acc##r##b = _mm256_setzero_ps();
  MENNY_TILE_ROWS(MENNY_DECLARE)
#undef MENNY_DECLARE
  for (std::size_t k = 0; k < depth; ++k, b += ldb) {
    const __m256 b0 = _mm256_loadu_ps(b);
    const __m256 b1 = _mm256_loadu_ps(b + 8);
#define MENNY_ACCUMULATE(r)                                   \
  if constexpr (ROWS > r) {                                   \
    const __m256 x = _mm256_broadcast_ss(a + r * lda + k);    \
    acc##r##a = _mm256_fmadd_ps(x, b0, acc##r##a);            \
    acc##r##b = _mm256_fmadd_ps(x, b1, acc##r##b);            \
  }
    MENNY_TILE_ROWS(MENNY_ACCUMULATE)
#undef MENNY_ACCUMULATE
  }
#define MENNY_STORE(r)                                                             \
  if constexpr (ROWS > r) {                                                        \
    const __m256 scale = _mm256_set1_ps(row_scale ? row_scale[r] : 1.0f);          \
    _mm256_storeu_ps(c + r * ldc, _mm256_mul_ps(acc##r##a, scale));                \
    _mm256_storeu_ps(c + r * ldc + 8, _mm256_mul_ps(acc##r##b, scale));            \
  }
  MENNY_TILE_ROWS(MENNY_STORE)
#undef MENNY_STORE
}
#undef MENNY_TILE_ROWS

// C[rows x cols] = A[rows x depth] * B[depth x cols] for cols a multiple of 16, B's columns
// 16 at a time b_step apart (16 for a row-major B; depth * 16 for B in 16-column panels).
MENNY_AVX2 void matmul16(const float* a, std::size_t lda, const float* b, std::size_t ldb, std::size_t b_step, float* c,
                         std::size_t ldc, std::size_t rows, std::size_t cols, std::size_t depth,
                         const float* row_scale) {
  for (std::size_t col = 0; col < cols; col += 16, b += b_step) {
    std::size_t row = 0;
    for (; row + 6 <= rows; row += 6) {
      tile16<6>(a + row * lda, lda, b, ldb, c + row * ldc + col, ldc, depth, row_scale ? row_scale + row : nullptr);
    }
    const float* a_rest = a + row * lda;
    float* c_rest = c + row * ldc + col;
    const float* scale_rest = row_scale ? row_scale + row : nullptr;
    switch (rows - row) {
      case 5: tile16<5>(a_rest, lda, b, ldb, c_rest, ldc, depth, scale_rest); break;
      case 4: tile16<4>(a_rest, lda, b, ldb, c_rest, ldc, depth, scale_rest); break;
      case 3: tile16<3>(a_rest, lda, b, ldb, c_rest, ldc, depth, scale_rest); break;
      case 2: tile16<2>(a_rest, lda, b, ldb, c_rest, ldc, depth, scale_rest); break;
      case 1: tile16<1>(a_rest, lda, b, ldb, c_rest, ldc, depth, scale_rest); break;
      default: break;
    }
  }
}

// q . key for a head_dim multiple of 16: two chains (one would wait on each multiply-add's
// latency), even and odd 8-column halves of every 16.
MENNY_AVX2 inline __m256 dot_chains(const float* query, const float* key, std::size_t head_dim) {
  __m256 even = _mm256_mul_ps(_mm256_loadu_ps(query), _mm256_loadu_ps(key));
  __m256 odd = _mm256_mul_ps(_mm256_loadu_ps(query + 8), _mm256_loadu_ps(key + 8));
  for (std::size_t d = 16; d < head_dim; d += 16) {
    even = _mm256_fmadd_ps(_mm256_loadu_ps(query + d), _mm256_loadu_ps(key + d), even);
    odd = _mm256_fmadd_ps(_mm256_loadu_ps(query + d + 8), _mm256_loadu_ps(key + d + 8), odd);
  }
  return _mm256_add_ps(even, odd);
}

// scores[r][j] = q_r . k_j straight from the key rows: for a few queries, cheaper than
// transposing the keys first.  Four keys at a time, so that eight chains are in flight, for every
// query in turn while those keys are in L1 (the queries of one audio's beams read its keys once);
// each key's sum is the same as alone.
MENNY_AVX2 void scores_direct_avx2(const float* q, const float* k, float* scores, std::size_t rows, std::size_t keys,
                                   std::size_t ld_scores, std::size_t head_dim, std::size_t row_stride) {
  std::size_t j = 0;
  for (; j + 4 <= keys; j += 4) {
    const float* key = k + j * row_stride;
    for (std::size_t r = 0; r < rows; ++r) {
      const float* query = q + r * row_stride;
      float* row = scores + r * ld_scores;
      const __m256 s0 = dot_chains(query, key, head_dim);
      const __m256 s1 = dot_chains(query, key + row_stride, head_dim);
      const __m256 s2 = dot_chains(query, key + 2 * row_stride, head_dim);
      const __m256 s3 = dot_chains(query, key + 3 * row_stride, head_dim);
      row[j] = horizontal_sum(s0);
      row[j + 1] = horizontal_sum(s1);
      row[j + 2] = horizontal_sum(s2);
      row[j + 3] = horizontal_sum(s3);
    }
  }
  for (; j < keys; ++j) {
    for (std::size_t r = 0; r < rows; ++r) {
      scores[r * ld_scores + j] = horizontal_sum(dot_chains(q + r * row_stride, k + j * row_stride, head_dim));
    }
  }
}

// out[0 : cols] = scale * (a[0 : depth] . B[0 : depth, 0 : cols]) for B's rows ldb apart and
// cols a multiple of 16: one query's weighted sum of values.  The same per-column chains as
// tile16<1> (so the same sums), but up to 64 columns per pass over B: eight chains instead of
// two, and each row of B read once, whole.  B's rows from `split` on are b_after's (a beam's own
// values after those its window's rows share): the same chains, continued.
#define MENNY_PANELS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
template <int LANES8>
MENNY_AVX2 inline void row_tile(const float* a, const float* b, const float* b_after, std::size_t split, std::size_t ldb,
                                float* out, std::size_t depth, float scale) {
#define MENNY_DECLARE(i) __m256 acc##i = _mm256_setzero_ps();
  MENNY_PANELS(MENNY_DECLARE)
#undef MENNY_DECLARE
  for (std::size_t k = 0; k < depth; ++k, b += ldb) {
    if (k == split) {
      b = b_after + split * ldb;
    }
    const __m256 x = _mm256_broadcast_ss(a + k);
#define MENNY_ACCUMULATE(i)                                            \
  if constexpr (LANES8 > i) {                                          \
    acc##i = _mm256_fmadd_ps(x, _mm256_loadu_ps(b + 8 * i), acc##i);   \
  }
    MENNY_PANELS(MENNY_ACCUMULATE)
#undef MENNY_ACCUMULATE
  }
  const __m256 vscale = _mm256_set1_ps(scale);
#define MENNY_STORE(i)                                                    \
  if constexpr (LANES8 > i) {                                             \
    _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(acc##i, vscale));         \
  }
  MENNY_PANELS(MENNY_STORE)
#undef MENNY_STORE
}
#undef MENNY_PANELS

MENNY_AVX2 void row_times_matrix_avx2(const float* a, const float* b, const float* b_after, std::size_t split,
                                      std::size_t ldb, float* out, std::size_t cols, std::size_t depth, float scale) {
  std::size_t col = 0;
  for (; col + 64 <= cols; col += 64) {
    row_tile<8>(a, b + col, b_after + col, split, ldb, out + col, depth, scale);
  }
  switch ((cols - col) / 16) {
    case 3: row_tile<6>(a, b + col, b_after + col, split, ldb, out + col, depth, scale); break;
    case 2: row_tile<4>(a, b + col, b_after + col, split, ldb, out + col, depth, scale); break;
    case 1: row_tile<2>(a, b + col, b_after + col, split, ldb, out + col, depth, scale); break;
    default: break;
  }
}

// One block of queries of one head: scores = q k^T into `scores` (rows x ld_scores), from the
// keys transposed into panels and zero-padded to ld_scores in `keys_t` or, without those, from
// k's rows (values likewise: from `values_t`, 16-column panels of `keys` rows each, or v's rows);
// e = exp(scale * (scores - row max)) in place; then out = (e v) / row sums, so the
// probabilities are never normalised one by one.
MENNY_AVX2 void attention_block_avx2(const float* q, const float* keys_t, const float* k, const float* values_t,
                                     const float* v, float* out, float* scores, float* inverse_sums, std::size_t rows,
                                     std::size_t keys, std::size_t ld_scores, std::size_t head_dim,
                                     std::size_t row_stride, float scale, std::size_t visible) {
  if (keys_t) {
    matmul16(q, row_stride, keys_t, 16, head_dim * 16, scores, ld_scores, rows, ld_scores, head_dim, nullptr);
  } else {
    scores_direct_avx2(q, k, scores, rows, keys, ld_scores, head_dim, row_stride);
  }
  for (std::size_t r = 0; r < rows; ++r) {
    float* row = scores + r * ld_scores;
    // Causal: row r sees the first visible + r keys (visible 0: all of them).
    for (std::size_t j = visible ? visible + r : keys; j < keys; ++j) {
      row[j] = -INFINITY;
    }
    inverse_sums[r] = 1.0f / exp_row_avx2(row, row, keys, scale);
  }
  if (values_t) {
    matmul16(scores, ld_scores, values_t, 16, keys * 16, out, row_stride, rows, head_dim, keys, inverse_sums);
  } else if (rows == 1) {
    row_times_matrix_avx2(scores, v, v, keys, row_stride, out, head_dim, keys, inverse_sums[0]);
  } else {
    matmul16(scores, ld_scores, v, row_stride, 16, out, row_stride, rows, head_dim, keys, inverse_sums);
  }
}

// Queries per task: the block's scores (48 x keys) stay in the core's L2 cache between the
// two products.
constexpr std::size_t kQueriesPerBlock = 48;
// The packed keys and values of up to this many floats stay allocated between calls (16 MB:
// a batch-1 encoder layer's need 6 MB).
constexpr std::size_t kPackedFloatsKept = std::size_t{1} << 22;
// From this many queries on, transposing the keys once pays for itself.
constexpr std::size_t kQueriesToTransposeKeys = 16;

// out (batch, n_q, state) = attention of q (batch, n_q, state) over the first n_k of the
// kv_rows rows of k, v (batch, kv_rows, state), head h being columns [h * head_dim,
// (h + 1) * head_dim) of each.  With causal_offset >= 0, query i sees keys [0, causal_offset + i].
void attention(const float* q, const float* k, const float* v, float* out, std::size_t batch, std::size_t n_q,
               std::size_t n_k, std::size_t kv_rows, std::size_t state, std::size_t n_head, float scale,
               std::ptrdiff_t causal_offset) {
  const std::size_t head_dim = state / n_head;
  const std::size_t keys_padded = (n_k + 15) / 16 * 16;
  const std::size_t heads = batch * n_head;
  // Keys transposed per head in panels of 16 keys, each (head_dim, 16) and contiguous, zero
  // past n_k: a tile then reads one 4 KB panel instead of rows a whole key row apart.  Values
  // per head in panels of 16 columns, each (n_k, 16) and contiguous: the weighted sums then read
  // one stream instead of 64 bytes from each of n_k rows a whole row apart (a page every two
  // rows: the TLB, not the arithmetic, set their pace).
  // Kept from call to call (thread_local: one per calling stream), up to a window's worth:
  // fresh pages cost a fault each.
  thread_local std::vector<float> packed;
  float* keys_t = nullptr;
  float* values_t = nullptr;
  if (n_q >= kQueriesToTransposeKeys) {
    packed.resize(std::max(packed.size(), heads * head_dim * (keys_padded + n_k)));
    keys_t = packed.data();
    values_t = keys_t + heads * head_dim * keys_padded;
    parallel_for(heads, n_k * head_dim, 1, [&](std::size_t begin, std::size_t end) {
      for (std::size_t bh = begin; bh < end; ++bh) {
        const std::size_t from = (bh / n_head) * kv_rows * state + (bh % n_head) * head_dim;
        float* panels = keys_t + bh * head_dim * keys_padded;
        float* value_panels = values_t + bh * head_dim * n_k;
        for (std::size_t j = 0; j < n_k; ++j) {
          float* dst = panels + j / 16 * head_dim * 16 + j % 16;
          const float* key = k + from + j * state;
          const float* value = v + from + j * state;
          for (std::size_t d = 0; d < head_dim; ++d) {
            dst[d * 16] = key[d];
            value_panels[d / 16 * n_k * 16 + j * 16 + d % 16] = value[d];
          }
        }
        // The last panel's keys past n_k give scores that are never read: zero, not stale.
        for (std::size_t j = n_k; j < keys_padded; ++j) {
          for (std::size_t d = 0; d < head_dim; ++d) {
            panels[j / 16 * head_dim * 16 + d * 16 + j % 16] = 0.0f;
          }
        }
      }
    });
  }
  const std::size_t blocks = (n_q + kQueriesPerBlock - 1) / kQueriesPerBlock;
  const std::size_t block_rows = std::min(n_q, kQueriesPerBlock);
  parallel_for(heads * blocks, block_rows * n_k * head_dim, 1, [&](std::size_t begin, std::size_t end) {
    thread_local std::vector<float> scratch;
    scratch.resize(block_rows * (keys_padded + 1));
    for (std::size_t task = begin; task < end; ++task) {
      const std::size_t bh = task / blocks, b = bh / n_head, h = bh % n_head;
      const std::size_t first = (task % blocks) * kQueriesPerBlock;
      const std::size_t offset = (b * n_q + first) * state + h * head_dim;
      const std::size_t kv_offset = b * kv_rows * state + h * head_dim;
      const std::size_t visible = causal_offset < 0 ? 0 : static_cast<std::size_t>(causal_offset) + first + 1;
      attention_block_avx2(q + offset, keys_t ? keys_t + bh * head_dim * keys_padded : nullptr, k + kv_offset,
                           values_t ? values_t + bh * head_dim * n_k : nullptr,
                           v + kv_offset, out + offset, scratch.data(),
                           scratch.data() + block_rows * keys_padded, std::min(kQueriesPerBlock, n_q - first), n_k,
                           keys_padded, head_dim, state, scale, visible);
    }
  });
  if (packed.size() > kPackedFloatsKept) {
    std::vector<float>().swap(packed);
  }
}

}  // namespace menny
#endif
