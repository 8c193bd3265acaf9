// Fast CPU kernels for the work that dominates Whisper on a CPU: softmax over the last axis,
// exact (erf) GELU, a fused multi-head attention, a decoding step's products and layers, the
// greedy choice of a token, and the encoder's matrix products over panels of the weights
// (AVX-512), as MLX primitives.
//
// Why: the mlx[cpu] wheel for Linux is built for baseline x86-64, so its exp/erf run one lane
// at a time, and a CPU stream runs on one thread.  These kernels use AVX2+FMA+F16C (checked at run
// time: the library loads on any CPU, and without AVX2 refuses to build its primitives, so the
// engine keeps MLX's ops) and split the work across the cores the process may use.
//
// Numerics: computed in float32 (other float dtypes are cast in and out).  exp is a range
// reduction plus a degree-5 polynomial (error ~2e-10 before rounding), erfc a fitted polynomial
// in t = 2 / (2 + z) under an exp (relative error < 4e-7 in float32): as accurate as MLX's own
// ops, and for GELU's negative tail far more.

#include <sched.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/vector.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
namespace nb = nanobind;

namespace {

// ------------------------------------------------------------------------------------------
// Threads
// ------------------------------------------------------------------------------------------

// Below this many elements per thread, waking a helper costs more than it saves.
constexpr std::size_t kMinElementsPerThread = 1 << 15;
// Work is handed out in blocks of about this many elements, first come first served: on a
// busy machine (or next to BLAS threads still spinning after a matrix product) one thread may
// get far less CPU than another, and a static split would wait for the slowest.
constexpr std::size_t kElementsPerBlock = 1 << 14;

// The cores this process may run on, or MENNY_KERNEL_THREADS if set lower.
std::size_t kernel_threads() {
  static const std::size_t count = [] {
    std::size_t cpus = std::max(1u, std::thread::hardware_concurrency());
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
      cpus = static_cast<std::size_t>(std::max(1, CPU_COUNT(&set)));
    }
#endif
    if (const char* wanted = std::getenv("MENNY_KERNEL_THREADS")) {
      const long n = std::strtol(wanted, nullptr, 10);
      if (n > 0) {
        cpus = std::min(cpus, static_cast<std::size_t>(n));
      }
    }
    return cpus;
  }();
  return count;
}

// A spinning thread's wait hint (lets the core's other work, and the bus, go first).
inline void pause() {
#if defined(__x86_64__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Work that any number of threads may join, each returning when nothing is left for it.
struct Task {
  virtual ~Task() = default;
  virtual void work() = 0;
};

// Blocks of [0, items) for whichever threads come; finished when `done` reaches `items`.
struct Job : Task {
  std::function<void(std::size_t, std::size_t)> fn;
  std::size_t items;
  std::size_t block;
  std::atomic<std::size_t> next{0};
  std::atomic<std::size_t> done{0};

  void work() override {
    for (std::size_t begin = next.fetch_add(block); begin < items; begin = next.fetch_add(block)) {
      const std::size_t end = std::min(items, begin + block);
      fn(begin, end);
      if (done.fetch_add(end - begin) + (end - begin) == items) {
        done.notify_all();
      }
    }
  }
};

// How long a helper keeps looking for the next task before it sleeps.  A decoding step is a
// string of calls a few tens of microseconds apart; waking a sleeping thread takes about as long
// as one of them, so without this the helper would join each call late.  Short, so that on a
// busy machine an idle helper takes little CPU from others.
constexpr auto kHelperSpin = std::chrono::microseconds(100);

// Helper threads started once and kept, waiting for tasks.  The caller works on its own task
// too and returns as soon as every block is done: a helper the scheduler has not run yet
// (the machine is busy) finds nothing left and costs the caller no wait.
class Helpers {
 public:
  // Never destroyed: helpers still waiting at exit must not see their queue destroyed.
  static Helpers& instance() {
    static Helpers* helpers = new Helpers(kernel_threads() - 1);
    return *helpers;
  }

  void offer(const std::shared_ptr<Task>& task, std::size_t count) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (std::size_t i = 0; i < count; ++i) {
        queue_.push_back(task);
      }
      queued_.store(queue_.size(), std::memory_order_release);
    }
    ready_.notify_all();
  }

 private:
  explicit Helpers(std::size_t count) {
    for (std::size_t i = 0; i < count; ++i) {
      std::thread([this] { serve(); }).detach();
    }
  }

  void serve() {
    for (;;) {
      std::shared_ptr<Task> task;
      {
        const auto until = std::chrono::steady_clock::now() + kHelperSpin;
        while (queued_.load(std::memory_order_acquire) == 0 && std::chrono::steady_clock::now() < until) {
          pause();
        }
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return !queue_.empty(); });
        task = std::move(queue_.front());
        queue_.pop_front();
        queued_.store(queue_.size(), std::memory_order_release);
      }
      task->work();
    }
  }

  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::shared_ptr<Task>> queue_;
  std::atomic<std::size_t> queued_{0};
};

// Calls fn(begin, end) on disjoint ranges covering [0, items), each a multiple of `grain`
// items (but the last), on up to kernel_threads() threads including the calling one.
template <class Fn>
void parallel_for(std::size_t items, std::size_t elements_per_item, std::size_t grain, Fn fn,
                  std::size_t elements_per_block = kElementsPerBlock) {
  const std::size_t threads = std::min(kernel_threads(), items * elements_per_item / kMinElementsPerThread);
  if (threads <= 1) {
    fn(std::size_t{0}, items);
    return;
  }
  std::size_t block = std::max<std::size_t>(1, elements_per_block / std::max<std::size_t>(1, elements_per_item));
  block = (block + grain - 1) / grain * grain;
  auto job = std::make_shared<Job>();
  job->fn = fn;
  job->items = items;
  job->block = block;
  Helpers::instance().offer(job, threads - 1);
  job->work();
  for (std::size_t done = job->done.load(); done < items; done = job->done.load()) {
    job->done.wait(done);
  }
}

// A string of stages, each a range of items handed out in blocks to whichever thread comes; a
// thread starts on stage s + 1 only once every item of stage s is done.  One call runs what
// would otherwise be one call per stage (each waking the helpers again).  A helper that comes
// late skips the stages already done, so the caller never waits for one that has not started.
class Pipeline : public Task {
 public:
  void add(std::size_t items, std::size_t block, std::function<void(std::size_t, std::size_t)> fn) {
    stages_.emplace_back(std::move(fn), items, block);
  }

  void work() override {
    for (Stage& stage : stages_) {
      for (std::size_t begin = stage.next.fetch_add(stage.block); begin < stage.items;
           begin = stage.next.fetch_add(stage.block)) {
        const std::size_t end = std::min(stage.items, begin + stage.block);
        stage.fn(begin, end);
        stage.done.fetch_add(end - begin, std::memory_order_acq_rel);
      }
      // The other thread's last block of this stage: microseconds, unless the scheduler took
      // that thread away, and then this one should give way.
      for (std::size_t spins = 0; stage.done.load(std::memory_order_acquire) < stage.items; ++spins) {
        if (spins < kSpinsBeforeYield) {
          pause();
        } else {
          std::this_thread::yield();
        }
      }
    }
  }

  // Runs every stage on up to kernel_threads() threads, the caller's included.
  static void run(const std::shared_ptr<Pipeline>& pipeline) {
    if (kernel_threads() > 1) {
      Helpers::instance().offer(pipeline, kernel_threads() - 1);
    }
    pipeline->work();
  }

 private:
  static constexpr std::size_t kSpinsBeforeYield = 4096;

  struct Stage {
    Stage(std::function<void(std::size_t, std::size_t)> fn, std::size_t items, std::size_t block)
        : fn(std::move(fn)), items(items), block(block) {}
    std::function<void(std::size_t, std::size_t)> fn;
    std::size_t items;
    std::size_t block;
    std::atomic<std::size_t> next{0};
    std::atomic<std::size_t> done{0};
  };
  std::deque<Stage> stages_;  // a deque: stages never move once added (they hold atomics)
};

// ------------------------------------------------------------------------------------------
// AVX2 + FMA kernels
// ------------------------------------------------------------------------------------------

#if defined(__x86_64__)
#define MENNY_AVX2 __attribute__((target("avx2,fma,f16c")))

bool cpu_has_avx2_fma() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

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
// transposing the keys first.  Four keys at a time, so that eight chains are in flight; each
// key's sum is the same as alone.
MENNY_AVX2 void scores_direct_avx2(const float* q, const float* k, float* scores, std::size_t rows, std::size_t keys,
                                   std::size_t ld_scores, std::size_t head_dim, std::size_t row_stride) {
  for (std::size_t r = 0; r < rows; ++r) {
    const float* query = q + r * row_stride;
    float* row = scores + r * ld_scores;
    std::size_t j = 0;
    for (; j + 4 <= keys; j += 4) {
      const float* key = k + j * row_stride;
      const __m256 s0 = dot_chains(query, key, head_dim);
      const __m256 s1 = dot_chains(query, key + row_stride, head_dim);
      const __m256 s2 = dot_chains(query, key + 2 * row_stride, head_dim);
      const __m256 s3 = dot_chains(query, key + 3 * row_stride, head_dim);
      row[j] = horizontal_sum(s0);
      row[j + 1] = horizontal_sum(s1);
      row[j + 2] = horizontal_sum(s2);
      row[j + 3] = horizontal_sum(s3);
    }
    for (; j < keys; ++j) {
      row[j] = horizontal_sum(dot_chains(query, k + j * row_stride, head_dim));
    }
  }
}

// out[0 : cols] = scale * (a[0 : depth] . B[0 : depth, 0 : cols]) for B's rows ldb apart and
// cols a multiple of 16: one query's weighted sum of values.  The same per-column chains as
// tile16<1> (so the same sums), but up to 64 columns per pass over B: eight chains instead of
// two, and each row of B read once, whole.
#define MENNY_PANELS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
template <int LANES8>
MENNY_AVX2 inline void row_tile(const float* a, const float* b, std::size_t ldb, float* out, std::size_t depth,
                                float scale) {
#define MENNY_DECLARE(i) __m256 acc##i = _mm256_setzero_ps();
  MENNY_PANELS(MENNY_DECLARE)
#undef MENNY_DECLARE
  for (std::size_t k = 0; k < depth; ++k, b += ldb) {
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

MENNY_AVX2 void row_times_matrix_avx2(const float* a, const float* b, std::size_t ldb, float* out, std::size_t cols,
                                      std::size_t depth, float scale) {
  std::size_t col = 0;
  for (; col + 64 <= cols; col += 64) {
    row_tile<8>(a, b + col, ldb, out + col, depth, scale);
  }
  switch ((cols - col) / 16) {
    case 3: row_tile<6>(a, b + col, ldb, out + col, depth, scale); break;
    case 2: row_tile<4>(a, b + col, ldb, out + col, depth, scale); break;
    case 1: row_tile<2>(a, b + col, ldb, out + col, depth, scale); break;
    default: break;
  }
}

// One block of queries of one head: scores = q k^T into `scores` (rows x ld_scores), from the
// keys transposed into panels and zero-padded to ld_scores in `keys_t` or, without those, from
// k's rows (values likewise: from `values_t`, 16-column panels of `keys` rows each, or v's rows); e = exp(scale * (scores - row max)) in place; then out = (e v) / row sums, so the
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
    row_times_matrix_avx2(scores, v, row_stride, out, head_dim, keys, inverse_sums[0]);
  } else {
    matmul16(scores, ld_scores, v, row_stride, 16, out, row_stride, rows, head_dim, keys, inverse_sums);
  }
}

// A greedy decoder's choice over one row of logits (decoding._greedy_choice): logits[v] counts as
// -inf where forbidden[v] or v lies in one of the [start, stop) ranges; with timestamp_begin <
// vocab, when all timestamps together are likelier than the likeliest text token (logsumexp of
// the timestamps' logits above the best text logit), text tokens are forbidden too.  The
// likeliest allowed token (the first of equals) and its log-probability among the allowed ones.
// `scratch` holds 2 * vocab floats.
MENNY_AVX2 std::pair<int32_t, float> greedy_choice_row(const float* logits, const bool* forbidden, const int32_t* ranges,
                                                       std::size_t n_ranges, std::size_t vocab,
                                                       std::size_t timestamp_begin, float* scratch) {
  float* row = scratch;
  float* exponentials = scratch + vocab;
  for (std::size_t v = 0; v < vocab; ++v) {
    row[v] = forbidden[v] ? -INFINITY : logits[v];
  }
  for (std::size_t r = 0; r < n_ranges; ++r) {
    const auto stop = std::min(static_cast<std::size_t>(std::max(ranges[2 * r + 1], 0)), vocab);
    const auto start = std::min(static_cast<std::size_t>(std::max(ranges[2 * r], 0)), stop);
    std::fill(row + start, row + stop, -INFINITY);
  }
  auto first_max = [&](std::size_t begin, std::size_t end) {
    std::size_t best = begin;
    for (std::size_t v = begin; v < end; ++v) {
      best = row[v] > row[best] ? v : best;
    }
    return best;
  };
  // exp_row_avx2 subtracts the maximum itself: the log of the sum of exp(logit - maximum).
  auto log_sum = [&](std::size_t begin, std::size_t end) {
    return std::log(exp_row_avx2(row + begin, exponentials, end - begin, 1.0f));
  };
  const std::size_t text = first_max(0, std::min(timestamp_begin, vocab));
  const float text_max = timestamp_begin > 0 ? row[text] : -INFINITY;
  if (timestamp_begin < vocab) {
    const std::size_t stamp = first_max(timestamp_begin, vocab);
    const float stamp_max = row[stamp];
    if (stamp_max > -INFINITY) {
      const float stamps = log_sum(timestamp_begin, vocab);
      // (stamps >= 0: a timestamp likelier than any text token always wins.)
      if (stamp_max + stamps > text_max) {
        return {static_cast<int32_t>(stamp), -stamps};
      }
    }
  }
  if (text_max == -INFINITY) {  // nothing allowed: as argmax and log_softmax over -inf give
    return {0, NAN};
  }
  return {static_cast<int32_t>(text), -log_sum(0, vocab)};
}

const bool kUseAvx2 = cpu_has_avx2_fma();
#else
const bool kUseAvx2 = false;
#endif

#if defined(__x86_64__)
// ------------------------------------------------------------------------------------------
// AVX-512: the encoder's matrix products
// ------------------------------------------------------------------------------------------

#define MENNY_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma,f16c")))

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && cpu_has_avx2_fma();
}

const bool kUseAvx512 = cpu_has_avx512();

// A product's output columns come 32 at a time from a panel: the 32 weight rows' values for
// each input column in turn, (depth, 32) contiguous, packed by the call (strip_product).
constexpr std::size_t kPanelWidth = 32;

// Sixteen weights as floats: float16 (raw bits) widened exactly, float32 as they are.
MENNY_AVX512 inline __m512 load16(const std::uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
MENNY_AVX512 inline __m512 load16(const float* p) {
  return _mm512_loadu_ps(p);
}

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
  // The same operations as the separate GELU kernel and MLX's add, on the stored values.
  for (int r = 0; r < ROWS && (gelu || residual); ++r) {
    float* row = c + r * ldc;
    for (std::size_t j = 0; j < kPanelWidth; j += 8) {
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
#undef MENNY_PANEL_ROWS

// panel_tile over `rows` rows of A (and of C and the residual), twelve at a time.
MENNY_AVX512 void panel_rows(const float* a, std::size_t lda, const float* panel, std::size_t depth, const float* bias,
                             bool gelu, const float* residual, float* c, std::size_t ldc, std::size_t rows) {
  auto tile = [&]<int ROWS>(std::size_t row) {
    panel_tile<ROWS>(a + row * lda, lda, panel, depth, bias, gelu, residual ? residual + row * ldc : nullptr,
                     c + row * ldc, ldc);
  };
  std::size_t row = 0;
  for (; row + 12 <= rows; row += 12) {
    tile.template operator()<12>(row);
  }
  switch (rows - row) {
    case 11: tile.template operator()<11>(row); break;
    case 10: tile.template operator()<10>(row); break;
    case 9: tile.template operator()<9>(row); break;
    case 8: tile.template operator()<8>(row); break;
    case 7: tile.template operator()<7>(row); break;
    case 6: tile.template operator()<6>(row); break;
    case 5: tile.template operator()<5>(row); break;
    case 4: tile.template operator()<4>(row); break;
    case 3: tile.template operator()<3>(row); break;
    case 2: tile.template operator()<2>(row); break;
    case 1: tile.template operator()<1>(row); break;
    default: break;
  }
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

#else
const bool kUseAvx512 = false;
#endif

// ------------------------------------------------------------------------------------------
// MLX primitives
// ------------------------------------------------------------------------------------------

// The stream's encoder, told what a primitive reads and writes.
mx::cpu::CommandEncoder& encoder_for(mx::Stream stream, const std::vector<mx::array>& inputs,
                                     std::vector<mx::array> outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& input : inputs) {
    encoder.set_input_array(input);
  }
  for (auto& output : outputs) {
    encoder.set_output_array(output);
  }
  return encoder;
}

class CpuKernel : public mx::UnaryPrimitive {
 public:
  using mx::UnaryPrimitive::UnaryPrimitive;

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error(std::string(name()) + " runs on the CPU only; use MLX's own op on a GPU");
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return std::string(name()) == other.name();
  }

 protected:
  // Gives `out` a fresh buffer and tells the stream what is read and written.
  mx::cpu::CommandEncoder& fresh_output(const std::vector<mx::array>& inputs, mx::array& out) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    return encode(inputs, out);
  }

  // For element-wise kernels: `out` takes over the input's buffer when it may (else a fresh
  // one), and the stream is told what is read and written.
  mx::cpu::CommandEncoder& output_like_input(const std::vector<mx::array>& inputs, mx::array& out) {
    if (inputs[0].is_donatable()) {
      out.copy_shared_buffer(inputs[0]);
    } else {
      out.set_data(mx::allocator::malloc(out.nbytes()));
    }
    return encode(inputs, out);
  }

 private:
  mx::cpu::CommandEncoder& encode(const std::vector<mx::array>& inputs, mx::array& out) {
    return encoder_for(stream(), inputs, {out});
  }
};

class MennySoftmax : public CpuKernel {
 public:
  using CpuKernel::CpuKernel;

  const char* name() const override {
    return "MennySoftmax";
  }

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& in = inputs[0];
    auto& encoder = output_like_input(inputs, out);
    const std::size_t n = in.shape(-1);
    const std::size_t rows = n == 0 ? 0 : in.size() / n;
#if defined(__x86_64__)
    encoder.dispatch([in, out, rows, n]() mutable {
      const float* src = in.data<float>();
      float* dst = out.data<float>();
      parallel_for(rows, n, 1, [=](std::size_t begin, std::size_t end) {
        softmax_rows_avx2(src + begin * n, dst + begin * n, end - begin, n);
      });
    });
#endif
  }
};

class MennyGelu : public CpuKernel {
 public:
  using CpuKernel::CpuKernel;

  const char* name() const override {
    return "MennyGelu";
  }

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& in = inputs[0];
    auto& encoder = output_like_input(inputs, out);
#if defined(__x86_64__)
    encoder.dispatch([in, out]() mutable {
      const float* src = in.data<float>();
      float* dst = out.data<float>();
      // Ranges of whole cache lines, so threads never write the same line.
      parallel_for(in.size(), 1, 16, [=](std::size_t begin, std::size_t end) {
        gelu_avx2(src + begin, dst + begin, end - begin);
      });
    });
#endif
  }
};

// Queries per task: the block's scores (48 x keys) stay in the core's L2 cache between the
// two products.
constexpr std::size_t kQueriesPerBlock = 48;
// The packed keys and values of up to this many floats stay allocated between calls (16 MB:
// a batch-1 encoder layer's need 6 MB).
constexpr std::size_t kPackedFloatsKept = std::size_t{1} << 22;
// From this many queries on, transposing the keys once pays for itself.
constexpr std::size_t kQueriesToTransposeKeys = 16;

#if defined(__x86_64__)
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

  // Rows [begin, end) of x (n_x, depth) @ this.T (+ bias), row j of the result at out + j * ld_out.
  void times(const float* x, std::size_t n_x, const float* bias, std::size_t depth, float* out, std::size_t ld_out,
             std::size_t begin, std::size_t end) const {
    with_weights([&](auto* w) { matvec_rows_avx2(x, n_x, w, bias, depth, out, ld_out, begin, end); });
  }
};
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

#if defined(__x86_64__)
// Rows of a decoding step's matvecs handed out at a time (a multiple of 8).
constexpr std::size_t kStepRowsPerBlock = 64;

// The inputs of a decoder layer's step, in the order the Python side passes them.
enum StepInput : std::size_t {
  kX, kOffset, kKeyCache, kValueCache, kCrossKeys, kCrossValues,
  kAttnLnWeight, kAttnLnBias, kQuery, kQueryBias, kKey, kValue, kValueBias, kOut, kOutBias,
  kCrossLnWeight, kCrossLnBias, kCrossQuery, kCrossQueryBias, kCrossOut, kCrossOutBias,
  kMlpLnWeight, kMlpLnBias, kMlp1, kMlp1Bias, kMlp2, kMlp2Bias, kStepInputs,
  // A step over the audio features (see decoder_layer_step) takes these in their place and more.
  kFramePanels = kCrossKeys, kChannelPanels = kCrossValues,
  kCrossKey = kStepInputs, kCrossValue, kCrossValueBias, kFeatureStepInputs
};

// One token's pass through a decoder layer (self-attention over the key cache, cross-attention
// over the audio, MLP; each behind a layer norm, each added to the residual) as one pipeline:
// the same kernels in the same order as the layer's ops (same bits), without a call per op.
// The token's key and value are written into the caches at the token's position, in place.
//
// Over the features (AVX-512 only): the cross-attention reads the audio features X (batch,
// frames, state), packed twice (see decoder_layer), instead of each layer's keys X Wk^T and
// values X Wv^T + bv.  A head's scores are q_h . (X Wk_h^T) = (q_h Wk_h) . X and its output
// Wv_h (p_h X) + bv_h (the probabilities sum to 1): the same values, summed in another order.
// X (3 MB for base) stays in the cache from layer to layer, where the keys and values (6 MB a
// layer) came from DRAM at every step, a third of base's step.
void decoder_layer_step(const std::vector<mx::array>& in, float* result, float* key_cache, float* value_cache,
                        std::size_t n_head, float scale, float eps, bool over_features) {
  const std::size_t batch = in[kX].shape(0), state = in[kX].shape(2), head_dim = state / n_head;
  const std::size_t ctx = in[kKeyCache].shape(1), hidden = in[kMlp1].shape(0);
  const std::size_t audio = over_features ? in[kChannelPanels].shape(2) : in[kCrossKeys].shape(1);
  const std::size_t position =
      std::clamp<std::ptrdiff_t>(in[kOffset].data<int32_t>()[0], 0, static_cast<std::ptrdiff_t>(ctx) - 1);
  auto vector = [&](StepInput i) { return in[i].data<float>(); };
  auto matrix = [&](StepInput i) { return Matrix(in[i]); };
  // Per batch row: a layer norm's output, the query, the attention's output, the residual
  // after self-attention and after cross-attention, and the MLP's hidden layer.
  std::vector<float> buffers(batch * (5 * state + hidden));
  float* normed = buffers.data();
  float* query = normed + batch * state;
  float* attended = query + batch * state;
  float* after_self = attended + batch * state;
  float* after_cross = after_self + batch * state;
  float* mlp = after_cross + batch * state;
  std::vector<float> feature_scratch;  // attend_features's

  auto pipeline = std::make_shared<Pipeline>();
  auto layer_norm = [&](const float* src, StepInput weight) {
    pipeline->add(1, 1, [=, w = vector(weight), b = vector(static_cast<StepInput>(weight + 1))](std::size_t,
                                                                                                std::size_t) {
      layer_norm_rows(src, w, b, normed, batch, state, eps);
    });
  };
  // dst (rows ld apart) = src @ w.T + bias for rows [0, rows) of w, handed out in blocks; then
  // `finish(dst row, begin, end)` on each block of each row.
  auto project = [&](const float* src, StepInput weight, const float* bias, float* dst, std::size_t ld,
                     std::function<void(float*, std::size_t, std::size_t)> finish) {
    const std::size_t depth = in[weight].shape(1);
    pipeline->add(in[weight].shape(0), kStepRowsPerBlock, [=, w = matrix(weight)](std::size_t begin, std::size_t end) {
      w.times(src, batch, bias, depth, dst, ld, begin, end);
      if (finish) {
        for (std::size_t b = 0; b < batch; ++b) {
          finish(dst + b * ld, begin, end);
        }
      }
    });
  };
  // dst = residual + dst, row by row (the rows `state` apart in both).
  auto add_to = [=](const float* residual, float* dst) {
    return [=](float* row, std::size_t begin, std::size_t end) {
      const float* from = residual + (row - dst);
      for (std::size_t i = begin; i < end; ++i) {
        row[i] = from[i] + row[i];
      }
    };
  };
  // The query's attention over the first n_keys of `rows` rows of keys and values (batch, rows,
  // state); visible: as in attention_block_avx2.
  auto attend = [&](const float* keys, const float* values, std::size_t rows, std::size_t n_keys, std::size_t visible) {
    pipeline->add(batch * n_head, 1, [=](std::size_t begin, std::size_t end) {
      thread_local std::vector<float> scratch;
      const std::size_t padded = (n_keys + 15) / 16 * 16;
      scratch.resize(padded + 1);
      for (std::size_t task = begin; task < end; ++task) {
        const std::size_t b = task / n_head, column = (task % n_head) * head_dim;
        const std::size_t kv = b * rows * state + column;
        attention_block_avx2(query + b * state + column, nullptr, keys + kv, nullptr, values + kv,
                             attended + b * state + column, scratch.data(), scratch.data() + padded, 1, n_keys,
                             padded, head_dim, state, scale, visible);
      }
    });
  };

  // The query's attention over the features (see above), into `attended`.
  auto attend_features = [&]() {
    const std::size_t n_panels = in[kFramePanels].shape(1), ld_scores = n_panels * kPanelWidth;
    const std::size_t heads = batch * n_head;
    // Per batch row and head: the folded query, the scores (then their exponentials) and the
    // weighted sum of the features; per head the inverse of its exponentials' sum.
    feature_scratch.resize(heads * (2 * state + ld_scores + 1));
    float* folded = feature_scratch.data();
    float* scores = folded + heads * state;
    float* mixed = scores + heads * ld_scores;
    float* inverse_sums = mixed + heads * state;
    const float* frame_panels = vector(kFramePanels);
    const float* channel_panels = vector(kChannelPanels);
    pipeline->add(heads, 1, [=, w = matrix(kCrossKey)](std::size_t begin, std::size_t end) {
      for (std::size_t task = begin; task < end; ++task) {
        const std::size_t b = task / n_head, first = (task % n_head) * head_dim;
        const float* q = query + b * state + first;
        w.with_weights([&](auto* weights) { fold_rows(q, weights + first * state, head_dim, state, folded + task * state); });
      }
    });
    pipeline->add(batch * n_panels, 1, [=](std::size_t begin, std::size_t end) {
      for (std::size_t task = begin; task < end; ++task) {
        const std::size_t b = task / n_panels, p = task % n_panels;
        panel_rows(folded + b * n_head * state, state, frame_panels + task * state * kPanelWidth, state,
                   nullptr, false, nullptr, scores + b * n_head * ld_scores + p * kPanelWidth, ld_scores, n_head);
      }
    });
    pipeline->add(heads, 1, [=](std::size_t begin, std::size_t end) {
      for (std::size_t task = begin; task < end; ++task) {
        float* row = scores + task * ld_scores;
        inverse_sums[task] = 1.0f / exp_row_avx2(row, row, audio, scale);
      }
    });
    const std::size_t column_panels = state / kPanelWidth;
    pipeline->add(batch * column_panels, 1, [=](std::size_t begin, std::size_t end) {
      for (std::size_t task = begin; task < end; ++task) {
        const std::size_t b = task / column_panels, column = task % column_panels * kPanelWidth;
        float* out = mixed + b * n_head * state + column;
        panel_rows(scores + b * n_head * ld_scores, ld_scores, channel_panels + task * audio * kPanelWidth, audio,
                   nullptr, false, nullptr, out, state, n_head);
        for (std::size_t h = 0; h < n_head; ++h) {
          for (std::size_t j = 0; j < kPanelWidth; ++j) {
            out[h * state + j] *= inverse_sums[b * n_head + h];
          }
        }
      }
    });
    // Each head's rows of the value projection times that head's weighted sum.
    pipeline->add(state, kStepRowsPerBlock,
                  [=, w = matrix(kCrossValue), bias = vector(kCrossValueBias)](std::size_t begin, std::size_t end) {
                    for (std::size_t row = begin; row < end;) {
                      const std::size_t h = row / head_dim, last = std::min(end, (h + 1) * head_dim);
                      for (std::size_t b = 0; b < batch; ++b) {
                        w.times(mixed + (b * n_head + h) * state, 1, bias, state, attended + b * state, 0, row, last);
                      }
                      row = last;
                    }
                  });
  };

  const float* x = vector(kX);
  layer_norm(x, kAttnLnWeight);
  // q, k and v in one stage: rows of the three matrices, k and v straight into the caches.
  const std::size_t cache_row = position * state, cache_ld = ctx * state;
  pipeline->add(3 * state, kStepRowsPerBlock,
                [=, q = matrix(kQuery), k = matrix(kKey), v = matrix(kValue), q_bias = vector(kQueryBias),
                 v_bias = vector(kValueBias)](std::size_t begin, std::size_t end) {
                  for (std::size_t row = begin; row < end;) {
                    const std::size_t which = row / state, first = row - which * state;
                    const std::size_t last = std::min(end, (which + 1) * state) - which * state;
                    if (which == 0) {
                      q.times(normed, batch, q_bias, state, query, state, first, last);
                    } else if (which == 1) {
                      k.times(normed, batch, nullptr, state, key_cache + cache_row, cache_ld, first, last);
                    } else {
                      v.times(normed, batch, v_bias, state, value_cache + cache_row, cache_ld, first, last);
                    }
                    row += last - first;
                  }
                });
  attend(key_cache, value_cache, ctx, position + 1, position + 1);
  project(attended, kOut, vector(kOutBias), after_self, state, add_to(x, after_self));
  layer_norm(after_self, kCrossLnWeight);
  project(normed, kCrossQuery, vector(kCrossQueryBias), query, state, nullptr);
  if (over_features) {
    attend_features();
  } else {
    attend(vector(kCrossKeys), vector(kCrossValues), audio, audio, 0);
  }
  project(attended, kCrossOut, vector(kCrossOutBias), after_cross, state, add_to(after_self, after_cross));
  layer_norm(after_cross, kMlpLnWeight);
  project(normed, kMlp1, vector(kMlp1Bias), mlp, hidden, [](float* row, std::size_t begin, std::size_t end) {
    gelu_avx2(row + begin, row + begin, end - begin);
  });
  project(mlp, kMlp2, vector(kMlp2Bias), result, state, add_to(after_cross, result));
  Pipeline::run(pipeline);
}
#endif

// mx.fast.layer_norm over the last axis (layer_norm_rows), rows split across the cores: MLX's
// own runs its ops one after the other on one thread, 2-3 ms for an encoder's (1500, 512).
class MennyLayerNorm : public CpuKernel {
 public:
  MennyLayerNorm(mx::Stream stream, float eps) : CpuKernel(stream), eps_(eps) {}

  const char* name() const override {
    return "MennyLayerNorm";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto* same = dynamic_cast<const MennyLayerNorm*>(&other);
    return same && same->eps_ == eps_;
  }

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = output_like_input(inputs, out);
    encoder.dispatch([x = inputs[0], weight = inputs[1], bias = inputs[2], out, eps = eps_]() mutable {
      const std::size_t n = x.shape(-1), rows = x.size() / n;
      const float* src = x.data<float>();
      const float *w = weight.data<float>(), *b = bias.data<float>();
      float* dst = out.data<float>();
      parallel_for(rows, n, 8, [=](std::size_t begin, std::size_t end) {
        layer_norm_rows(src + begin * n, w, b, dst + begin * n, end - begin, n, eps);
      });
    });
  }

 private:
  float eps_;
};

class MennyAttention : public CpuKernel {
 public:
  MennyAttention(mx::Stream stream, int n_head, float scale) : CpuKernel(stream), n_head_(n_head), scale_(scale) {}

  const char* name() const override {
    return "MennyAttention";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto* same = dynamic_cast<const MennyAttention*>(&other);
    return same && same->n_head_ == n_head_ && same->scale_ == scale_;
  }

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = fresh_output(inputs, out);
#if defined(__x86_64__)
    // A fourth input, the position of the first query, makes it causal over a key cache.
    const std::optional<mx::array> offset = inputs.size() > 3 ? std::optional(inputs[3]) : std::nullopt;
    encoder.dispatch([q = inputs[0], k = inputs[1], v = inputs[2], offset, out, n_head = n_head_,
                      scale = scale_]() mutable {
      const std::size_t n_q = q.shape(1), kv_rows = k.shape(1);
      std::ptrdiff_t causal_offset = -1;
      std::size_t n_k = kv_rows;
      if (offset) {
        causal_offset = std::clamp<std::ptrdiff_t>(offset->data<int32_t>()[0], 0, kv_rows - n_q);
        n_k = causal_offset + n_q;
      }
      attention(q.data<float>(), k.data<float>(), v.data<float>(), out.data<float>(), q.shape(0), n_q, n_k, kv_rows,
                q.shape(2), n_head, scale, causal_offset);
    });
#endif
  }

 private:
  int n_head_;
  float scale_;
};

// Whether a's elements lie in row-major order in its memory (a view into a larger buffer too).
bool in_row_order(const mx::array& a) {
  std::int64_t stride = 1;
  for (int axis = a.ndim() - 1; axis >= 0; --axis) {
    if (a.shape(axis) != 1 && a.strides()[axis] != stride) {
      return false;
    }
    stride *= a.shape(axis);
  }
  return true;
}

// a's elements in row-major order, into `to` (a's size times its item size), or into a new array.
mx::array copy_in_row_order(const mx::array& a, char* to = nullptr) {
  std::optional<mx::array> fresh;
  if (!to) {
    fresh.emplace(a.shape(), a.dtype(), nullptr, std::vector<mx::array>{});
    fresh->set_data(mx::allocator::malloc(fresh->nbytes()));
    to = fresh->data<char>();
  }
  const std::size_t item = a.itemsize();
  const char* from = a.data<char>();
  std::vector<int> index(a.ndim(), 0);
  for (std::size_t n = 0; n < a.size(); ++n, to += item) {
    std::int64_t offset = 0;
    for (int axis = 0; axis < a.ndim(); ++axis) {
      offset += index[axis] * a.strides()[axis];
    }
    std::copy_n(from + offset * static_cast<std::int64_t>(item), item, to);
    for (int axis = a.ndim() - 1; axis >= 0 && ++index[axis] == a.shape(axis); --axis) {
      index[axis] = 0;
    }
  }
  return fresh ? *fresh : a;
}

// A matvec hands out its rows in blocks of this many weights (256 KB of float16): long
// enough runs of contiguous memory for the prefetches to stay ahead.
constexpr std::size_t kWeightsPerBlock = 1 << 17;

// x (..., depth) times w (n, depth) transposed, x and w its first inputs: (..., n).
class CpuProduct : public CpuKernel {
 public:
  using CpuKernel::CpuKernel;

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    mx::Shape shape = inputs[0].shape();
    shape.back() = inputs[1].shape(0);
    return {shape};
  }
};

// x (..., depth) times w (n_w, depth) transposed, for few rows of x: w is read once, as in a
// matrix-vector product.  (OpenBLAS's sgemm first copies all of w into packed panels, which
// for one row of x doubles the memory traffic of a step's vocabulary projection.)
class MennyMatvec : public CpuProduct {
 public:
  using CpuProduct::CpuProduct;

  const char* name() const override {
    return "MennyMatvec";
  }

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = fresh_output(inputs, out);
#if defined(__x86_64__)
    const std::optional<mx::array> bias = inputs.size() > 2 ? std::optional(inputs[2]) : std::nullopt;
    // The weights come as they are (the decoder's are views of one buffer, which contiguous()
    // would copy every call); ones not in row order are copied here.
    encoder.dispatch([x = inputs[0], given = inputs[1], bias, out]() mutable {
      const mx::array w = in_row_order(given) ? given : copy_in_row_order(given);
      const std::size_t depth = w.shape(1), n_w = w.shape(0), n_x = x.size() / depth;
      const float* xs = x.data<float>();
      const float* bs = bias ? bias->data<float>() : nullptr;
      float* dst = out.data<float>();
      parallel_for(
          n_w, n_x * depth, 8,
          [=, matrix = Matrix(w)](std::size_t begin, std::size_t end) {
            matrix.times(xs, n_x, bs, depth, dst, n_w, begin, end);
          },
          kWeightsPerBlock);
    });
#endif
  }
};

// x (..., depth) @ w.T + bias, then GELU and + residual as asked, for w (n, depth) packed 32
// rows at a time into panels (strip_product): the encoder's products, the audio's keys and
// values, a prompt's products.  Unlike sgemm's, the packing is per strip, in the cache, and the
// bias, GELU and residual are applied while the result is there too.
class MennyPanelProduct : public CpuProduct {
 public:
  MennyPanelProduct(mx::Stream stream, bool has_bias, bool gelu, bool has_residual)
      : CpuProduct(stream), has_bias_(has_bias), gelu_(gelu), has_residual_(has_residual) {}

  const char* name() const override {
    return "MennyPanelProduct";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto* same = dynamic_cast<const MennyPanelProduct*>(&other);
    return same && same->has_bias_ == has_bias_ && same->gelu_ == gelu_ && same->has_residual_ == has_residual_;
  }

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = fresh_output(inputs, out);
#if defined(__x86_64__)
    const std::optional<mx::array> bias = has_bias_ ? std::optional(inputs[2]) : std::nullopt;
    const std::optional<mx::array> residual = has_residual_ ? std::optional(inputs.back()) : std::nullopt;
    encoder.dispatch([x = inputs[0], given = inputs[1], bias, residual, gelu = gelu_, out]() mutable {
      const mx::array w = in_row_order(given) ? given : copy_in_row_order(given);
      const std::size_t depth = w.shape(1), n = out.shape(-1), rows = x.size() / depth;
      const float* xs = x.data<float>();
      const float* bs = bias ? bias->data<float>() : nullptr;
      const float* rs = residual ? residual->data<float>() : nullptr;
      float* dst = out.data<float>();
      parallel_for(n / kPanelWidth, rows * depth * kPanelWidth, 1,
                   [=, matrix = Matrix(w)](std::size_t begin, std::size_t end) {
                     matrix.with_weights([&](auto* weights) {
                       strip_product(xs, weights, depth, n, rows, bs, gelu, rs, dst, begin, end);
                     });
                   });
    });
#endif
  }

 private:
  bool has_bias_;
  bool gelu_;
  bool has_residual_;
};

// A decoder layer's one-token step (decoder_layer_step).  Outputs: the layer's output, then the
// key and value caches, which are the input caches' memory with the token's key and value
// written at its position.  In place, not copied (MLX would copy a cache the caller still
// holds, 2 x 0.7-0.9 MB per layer and step): the decoding loop keeps only the newest cache and
// never reads the old one's positions from the token's on.
class MennyDecoderStep : public mx::Primitive {
 public:
  MennyDecoderStep(mx::Stream stream, int n_head, float scale, float eps, bool over_features)
      : mx::Primitive(stream), n_head_(n_head), scale_(scale), eps_(eps), over_features_(over_features) {}

  const char* name() const override {
    return "MennyDecoderStep";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto* same = dynamic_cast<const MennyDecoderStep*>(&other);
    return same && same->n_head_ == n_head_ && same->scale_ == scale_ && same->eps_ == eps_ &&
           same->over_features_ == over_features_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[kX].shape(), inputs[kKeyCache].shape(), inputs[kValueCache].shape()};
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("MennyDecoderStep runs on the CPU only; use MLX's own ops on a GPU");
  }

  // The inputs come as they are, without a contiguous() node each (27 a layer: building and
  // evaluating those cost a step a third of a millisecond); one not in row order is copied here.
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    outputs[0].set_data(mx::allocator::malloc(outputs[0].nbytes()));
    for (std::size_t i : {std::size_t{1}, std::size_t{2}}) {
      const mx::array& cache = inputs[i == 1 ? kKeyCache : kValueCache];
      if (in_row_order(cache)) {
        outputs[i].copy_shared_buffer(cache);
      } else {
        outputs[i].set_data(mx::allocator::malloc(outputs[i].nbytes()));
      }
    }
    auto& encoder = encoder_for(stream(), inputs, outputs);
#if defined(__x86_64__)
    encoder.dispatch([inputs, outputs, n_head = n_head_, scale = scale_, eps = eps_,
                      over_features = over_features_]() mutable {
      std::vector<mx::array> ordered;
      for (const mx::array& input : inputs) {
        ordered.push_back(in_row_order(input) ? input : copy_in_row_order(input));
      }
      for (std::size_t i : {std::size_t{1}, std::size_t{2}}) {
        const mx::array& cache = inputs[i == 1 ? kKeyCache : kValueCache];
        if (!in_row_order(cache)) {
          copy_in_row_order(cache, outputs[i].data<char>());
        }
      }
      decoder_layer_step(ordered, outputs[0].data<float>(), outputs[1].data<float>(), outputs[2].data<float>(),
                         n_head, scale, eps, over_features);
    });
#endif
  }

 private:
  int n_head_;
  float scale_;
  float eps_;
  bool over_features_;
};

// Each row's greedy choice (greedy_choice_row).  Outputs: the chosen ids (batch,) int32 and
// their log-probabilities (batch,) float32.
class MennyGreedyChoice : public mx::Primitive {
 public:
  MennyGreedyChoice(mx::Stream stream, int timestamp_begin) : mx::Primitive(stream), timestamp_begin_(timestamp_begin) {}

  const char* name() const override {
    return "MennyGreedyChoice";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto* same = dynamic_cast<const MennyGreedyChoice*>(&other);
    return same && same->timestamp_begin_ == timestamp_begin_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0)}, {inputs[0].shape(0)}};
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("MennyGreedyChoice runs on the CPU only");
  }

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    for (mx::array& out : outputs) {
      out.set_data(mx::allocator::malloc(out.nbytes()));
    }
    auto& encoder = encoder_for(stream(), inputs, outputs);
#if defined(__x86_64__)
    encoder.dispatch([logits = inputs[0], forbidden = inputs[1], ranges = inputs[2], chosen = outputs[0],
                      logprobs = outputs[1], timestamp_begin = timestamp_begin_]() mutable {
      const std::size_t batch = logits.shape(0), vocab = logits.shape(1), n_ranges = ranges.shape(1);
      thread_local std::vector<float> scratch;
      scratch.resize(2 * vocab);
      for (std::size_t b = 0; b < batch; ++b) {
        const bool* mask = forbidden.data<bool>() + (forbidden.shape(0) == 1 ? 0 : b * vocab);
        const auto [token, logprob] =
            greedy_choice_row(logits.data<float>() + b * vocab, mask, ranges.data<int32_t>() + b * n_ranges * 2,
                              n_ranges, vocab, static_cast<std::size_t>(timestamp_begin), scratch.data());
        chosen.data<int32_t>()[b] = token;
        logprobs.data<float>()[b] = logprob;
      }
    });
#endif
  }

 private:
  int timestamp_begin_;
};

// The default stream, if the kernels can run on it (every primitive is built through here, so
// none is evaluated on a CPU without the AVX2 code).
mx::Stream cpu_stream() {
  if (!kUseAvx2) {
    throw std::invalid_argument("these kernels need an x86-64 CPU with AVX2, FMA and F16C");
  }
  const mx::Stream stream = mx::to_stream({});
  if (stream.device != mx::Device::cpu) {
    throw std::invalid_argument("these kernels run on the CPU; the default device is a GPU");
  }
  return stream;
}

// A row-major float32 version of x (no copy when it is one already).
mx::array float32_rows(const mx::array& x, mx::Stream stream) {
  if (!mx::issubdtype(x.dtype(), mx::floating)) {
    throw std::invalid_argument("expected a floating-point array, got another dtype");
  }
  return mx::contiguous(mx::astype(x, mx::float32, stream), false, stream);
}

template <class Kernel>
mx::array apply(const mx::array& x) {
  const mx::Stream stream = cpu_stream();
  const mx::array in = float32_rows(x, stream);
  mx::array out(in.shape(), mx::float32, std::make_shared<Kernel>(stream), {in});
  return x.dtype() == mx::float32 ? out : mx::astype(out, x.dtype(), stream);
}

mx::array multi_head_attention(const mx::array& q, const mx::array& k, const mx::array& v, int n_head, float scale,
                               const std::optional<mx::array>& offset) {
  if (q.ndim() != 3 || k.ndim() != 3 || v.ndim() != 3 || k.shape() != v.shape() || q.shape(0) != k.shape(0) ||
      q.shape(2) != k.shape(2)) {
    throw std::invalid_argument("expected q (batch, queries, state) and k, v (batch, keys, state)");
  }
  if (n_head <= 0 || q.shape(2) % n_head != 0 || (q.shape(2) / n_head) % 16 != 0 || k.shape(1) == 0) {
    throw std::invalid_argument("the state must split into heads of a multiple of 16, over at least one key");
  }
  if (!(scale > 0.0f)) {
    throw std::invalid_argument("the scale must be positive");
  }
  const mx::Stream stream = cpu_stream();
  std::vector<mx::array> inputs{float32_rows(q, stream), float32_rows(k, stream), float32_rows(v, stream)};
  if (offset) {
    if (offset->size() != 1 || offset->dtype() != mx::int32 || q.shape(1) > k.shape(1)) {
      throw std::invalid_argument("the offset is one int32 and the queries fit in the key cache");
    }
    inputs.push_back(*offset);
  }
  mx::array out(q.shape(), mx::float32, std::make_shared<MennyAttention>(stream, n_head, scale), std::move(inputs));
  return q.dtype() == mx::float32 ? out : mx::astype(out, q.dtype(), stream);
}

mx::array matvec(const mx::array& x, const mx::array& w, const std::optional<mx::array>& bias) {
  if (x.ndim() < 1 || w.ndim() != 2 || x.shape(-1) != w.shape(1) || w.shape(1) == 0) {
    throw std::invalid_argument("expected x (..., depth) and w (n, depth)");
  }
  if (bias && (bias->ndim() != 1 || bias->shape(0) != w.shape(0))) {
    throw std::invalid_argument("expected a bias (n,) for w (n, depth)");
  }
  const mx::Stream stream = cpu_stream();
  mx::Shape shape = x.shape();
  shape.back() = w.shape(0);
  // float16 weights stay float16: half the bytes to read.
  const mx::array weights = w.dtype() == mx::float16 || w.dtype() == mx::float32 ? w : mx::astype(w, mx::float32, stream);
  std::vector<mx::array> inputs{float32_rows(x, stream), weights};
  if (bias) {
    inputs.push_back(float32_rows(*bias, stream));
  }
  mx::array out(shape, mx::float32, std::make_shared<MennyMatvec>(stream), std::move(inputs));
  return x.dtype() == mx::float32 ? out : mx::astype(out, x.dtype(), stream);
}

mx::array panel_product(const mx::array& x, const mx::array& w, const std::optional<mx::array>& bias,
                        const std::optional<mx::array>& residual, bool gelu) {
  if (!kUseAvx512) {
    throw std::invalid_argument("the panel product needs AVX-512");
  }
  if (x.ndim() < 1 || x.dtype() != mx::float32 || w.ndim() != 2 || w.shape(0) % kPanelWidth != 0 ||
      w.shape(1) != x.shape(-1) || x.shape(-1) == 0 || (w.dtype() != mx::float32 && w.dtype() != mx::float16)) {
    throw std::invalid_argument("expected float32 x (..., depth) and a float32 or float16 matrix (n, depth), n a "
                                "multiple of 32");
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
  // w as it is: a view into a larger buffer (a decoder's weights, see TextDecoder.store_weights_in_half)
  // would be copied by a contiguous() node.
  std::vector<mx::array> inputs{float32_rows(x, stream), w};
  if (bias) {
    inputs.push_back(float32_rows(*bias, stream));
  }
  if (residual) {
    inputs.push_back(float32_rows(*residual, stream));
  }
  return mx::array(shape, mx::float32, std::make_shared<MennyPanelProduct>(stream, bias.has_value(), gelu,
                                                                           residual.has_value()),
                   std::move(inputs));
}

mx::array layer_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, float eps) {
  if (x.ndim() < 1 || x.dtype() != mx::float32 || weight.shape() != mx::Shape{x.shape(-1)} ||
      bias.shape() != weight.shape()) {
    throw std::invalid_argument("expected x (..., n) float32 and a weight and bias (n,)");
  }
  const mx::Stream stream = cpu_stream();
  std::vector<mx::array> inputs{float32_rows(x, stream), float32_rows(weight, stream), float32_rows(bias, stream)};
  return mx::array(x.shape(), mx::float32, std::make_shared<MennyLayerNorm>(stream, eps), std::move(inputs));
}

std::vector<mx::array> decoder_layer(const mx::array& x, const mx::array& offset, const mx::array& key_cache,
                                     const mx::array& value_cache, const mx::array& audio, const mx::array& audio_second,
                                     const std::vector<mx::array>& weights, int n_head, float eps, bool over_features) {
  auto expect = [](bool ok, const char* what) {
    if (!ok) {
      throw std::invalid_argument(what);
    }
  };
  expect(x.ndim() == 3 && x.shape(1) == 1 && x.dtype() == mx::float32, "expected x (batch, 1, state), float32");
  const int batch = x.shape(0), state = x.shape(2);
  expect(n_head > 0 && state % n_head == 0 && (state / n_head) % 16 == 0,
         "the state must split into heads of a multiple of 16");
  expect(offset.size() == 1 && offset.dtype() == mx::int32, "the offset is one int32");
  auto rows_of_state = [&](const mx::array& a) {
    return a.ndim() == 3 && a.shape(0) == batch && a.shape(2) == state && a.shape(1) > 0 && a.dtype() == mx::float32;
  };
  expect(rows_of_state(key_cache) && key_cache.shape() == value_cache.shape(),
         "expected the caches (batch, n_ctx, state), float32");
  if (over_features) {
    expect(kUseAvx512, "a step over the audio features needs AVX-512");
    const int width = kPanelWidth, frames = audio_second.ndim() == 4 ? audio_second.shape(2) : 0;
    expect(state % width == 0 && frames > 0 && audio.dtype() == mx::float32 && audio_second.dtype() == mx::float32 &&
               audio.shape() == mx::Shape({batch, (frames + width - 1) / width, state, width}) &&
               audio_second.shape() == mx::Shape({batch, state / width, frames, width}),
           "expected the audio features (batch, frames, state) as frame panels (batch, frames / 32 rounded up, "
           "state, 32) and channel panels (batch, state / 32, frames, 32), float32");
  } else {
    expect(rows_of_state(audio) && audio.shape() == audio_second.shape(),
           "expected the audio's keys and values (batch, frames, state), float32");
  }
  const std::size_t n_weights = (over_features ? kFeatureStepInputs : kStepInputs) - kAttnLnWeight;
  expect(weights.size() == n_weights, over_features ? "expected the layer's 24 weights in order"
                                                    : "expected the layer's 21 weights in order");
  const mx::Stream stream = cpu_stream();
  std::vector<mx::array> inputs{x, offset, key_cache, value_cache, audio, audio_second};
  const int hidden = weights[kMlp1 - kAttnLnWeight].shape(0);
  const std::size_t matrices[] = {kQuery, kKey, kValue, kOut, kCrossQuery, kCrossOut, kMlp1, kMlp2, kCrossKey,
                                  kCrossValue};
  for (std::size_t i = kAttnLnWeight; i < kAttnLnWeight + n_weights; ++i) {
    const mx::array& w = weights[i - kAttnLnWeight];
    if (std::find(std::begin(matrices), std::end(matrices), i) != std::end(matrices)) {
      const int rows = i == kMlp1 ? hidden : state, depth = i == kMlp2 ? hidden : state;
      expect(w.ndim() == 2 && w.shape(0) == rows && w.shape(1) == depth &&
                 (w.dtype() == mx::float16 || w.dtype() == mx::float32),
             "a weight matrix has the wrong shape or dtype (float16 or float32)");
    } else {
      expect(w.ndim() == 1 && w.shape(0) == (i == kMlp1Bias ? hidden : state) && w.dtype() == mx::float32,
             "a bias or layer-norm weight has the wrong shape or dtype (float32)");
    }
    inputs.push_back(w);
  }
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(state / n_head)));
  return mx::array::make_arrays({x.shape(), key_cache.shape(), value_cache.shape()},
                                {mx::float32, mx::float32, mx::float32},
                                std::make_shared<MennyDecoderStep>(stream, n_head, scale, eps, over_features), inputs);
}

std::vector<mx::array> greedy_choice(const mx::array& logits, const mx::array& forbidden, const mx::array& ranges,
                                     int timestamp_begin) {
  if (logits.ndim() != 2 || !mx::issubdtype(logits.dtype(), mx::floating) || forbidden.ndim() != 2 ||
      forbidden.dtype() != mx::bool_ || forbidden.shape(1) != logits.shape(1) ||
      (forbidden.shape(0) != 1 && forbidden.shape(0) != logits.shape(0)) || ranges.ndim() != 3 ||
      ranges.shape(0) != logits.shape(0) || ranges.shape(2) != 2 || !mx::issubdtype(ranges.dtype(), mx::integer) ||
      timestamp_begin < 0) {
    throw std::invalid_argument(
        "expected logits (batch, vocab), a forbidden mask (1 or batch, vocab), ranges (batch, n, 2) of integers "
        "and timestamp_begin >= 0");
  }
  const mx::Stream stream = cpu_stream();
  std::vector<mx::array> inputs{float32_rows(logits, stream), mx::contiguous(forbidden, false, stream),
                                mx::contiguous(mx::astype(ranges, mx::int32, stream), false, stream)};
  return mx::array::make_arrays({{logits.shape(0)}, {logits.shape(0)}}, {mx::int32, mx::float32},
                                std::make_shared<MennyGreedyChoice>(stream, timestamp_begin), inputs);
}

// Linux 6.1's madvise: back a range by huge pages now (copying what is there), whatever the
// system's transparent-huge-page setting short of "never".
#if defined(__linux__) && !defined(MADV_COLLAPSE)
#define MADV_COLLAPSE 25
#endif

bool huge_pages(mx::array a) {
  mx::eval(a);
#if defined(__linux__)
  constexpr std::uintptr_t kHugePage = std::uintptr_t{2} << 20;
  const auto start = reinterpret_cast<std::uintptr_t>(a.data<char>());
  const std::uintptr_t first = (start + kHugePage - 1) & ~(kHugePage - 1);
  const std::uintptr_t last = (start + a.data_size() * a.itemsize()) & ~(kHugePage - 1);
  return last > first && madvise(reinterpret_cast<void*>(first), last - first, MADV_COLLAPSE) == 0;
#else
  return false;
#endif
}

}  // namespace

NB_MODULE(_fast_ops, m) {
  m.doc() = "Menny's CPU kernels for softmax, GELU and attention as MLX primitives";
  m.def("softmax", &apply<MennySoftmax>, nb::arg("x"),
        "Softmax over the last axis, like mx.softmax(x, axis=-1, precise=True).");
  m.def("gelu", &apply<MennyGelu>, nb::arg("x"), "Exact GELU, x * Phi(x), like mlx.nn.gelu.");
  m.def("attention", &multi_head_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("n_head"),
        nb::arg("scale"), nb::arg("offset") = nb::none(),
        "Attention of q (batch, queries, state) over k, v (batch, keys, state) with n_head heads, "
        "heads merged: (batch, queries, state).  Unmasked, or with offset (an int32 array of one element) "
        "causal over a key cache: query i sees keys [0, offset + i].  Needs AVX2+FMA and heads of a "
        "multiple of 16.");
  m.def("matvec", &matvec, nb::arg("x"), nb::arg("w"), nb::arg("bias") = nb::none(),
        "x (..., depth) @ w.T (+ bias) for w (n, depth), float32 or float16, reading w once: for a few rows "
        "of x.  The result is float32 (x's dtype if another).");
  m.def("panel_product", &panel_product, nb::arg("x"), nb::arg("w"), nb::arg("bias") = nb::none(),
        nb::arg("residual") = nb::none(), nb::arg("gelu") = false,
        "x (..., depth) float32 @ w.T (+ bias), exact GELU if asked, + residual if given, for w (n, depth) "
        "float32 or float16, n a multiple of 32, packed 32 rows at a time into panels by each call.  "
        "Needs AVX-512.");
  m.def("uses_avx512", [] { return kUseAvx512; }, "Whether this CPU runs the AVX-512 panel product.");
  m.def("layer_norm", &layer_norm, nb::arg("x"), nb::arg("weight"), nb::arg("bias"), nb::arg("eps"),
        "Layer norm over the last axis of float32 x, the same bits as mx.fast.layer_norm.");
  m.def("decoder_layer", &decoder_layer, nb::arg("x"), nb::arg("offset"), nb::arg("key_cache"),
        nb::arg("value_cache"), nb::arg("audio"), nb::arg("audio_second"), nb::arg("weights"), nb::arg("n_head"),
        nb::arg("eps"), nb::arg("over_features") = false,
        "One token's step through a decoder layer: x (batch, 1, state) at position offset (an int32 array "
        "of one element), the self-attention caches (batch, n_ctx, state), the audio's keys and values "
        "(batch, n_audio, state), all float32, and the weights in order: attn_ln weight, bias; query "
        "weight, bias; key weight; value weight, bias; out weight, bias; cross_attn_ln weight, bias; cross "
        "query weight, bias; cross out weight, bias; mlp_ln weight, bias; mlp1 weight, bias; mlp2 weight, "
        "bias (matrices float32 or float16).  With over_features (AVX-512): the audio features f (batch, "
        "n_audio, state) as frame panels (batch, n_audio / 32 rounded up, state, 32): [b, p, c, j] = f[b, 32 p "
        "+ j, c], 0 past n_audio; and channel panels (batch, state / 32, n_audio, 32): [b, p, i, j] = f[b, i, "
        "32 p + j], in place of the keys and values, and three more weights: cross key weight, cross value "
        "weight, bias.  Returns the output and the caches, written in place.");
  m.def("greedy_choice", &greedy_choice, nb::arg("logits"), nb::arg("forbidden"), nb::arg("ranges"),
        nb::arg("timestamp_begin"),
        "Each row's likeliest allowed token (int32) and its log-probability among the allowed ones "
        "(float32): forbidden (1 or batch, vocab) bool and ranges (batch, n, 2) of [start, stop) forbid "
        "tokens; from timestamp_begin on (vocab or more: no timestamps) the tokens are timestamps, and "
        "when all of them together are likelier than the likeliest text token, text is forbidden.");
  m.def("huge_pages", &huge_pages, nb::arg("a"),
        "Evaluates a and asks Linux to back the 2 MB pages wholly inside its memory by huge pages "
        "(MADV_COLLAPSE); whether it did.");
  m.def("uses_avx2", [] { return kUseAvx2; }, "Whether this CPU runs the AVX2+FMA kernels.");
  m.def("threads", [] { return kernel_threads(); }, "How many threads a large op is split across.");
}
