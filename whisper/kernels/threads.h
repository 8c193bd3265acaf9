// Threads: the kernels' helper threads, and the two ways work is split across them
// (parallel_for for one range of items, Pipeline for a string of stages).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <thread>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace menny {

// Below this many elements per thread, waking a helper costs more than it saves.
constexpr std::size_t kMinElementsPerThread = 1 << 15;
// Work is handed out in blocks of about this many elements, first come first served: on a
// busy machine (or next to BLAS threads still spinning after a matrix product) one thread may
// get far less CPU than another, and a static split would wait for the slowest.
constexpr std::size_t kElementsPerBlock = 1 << 14;

// The cores this process may run on, or MENNY_KERNEL_THREADS if set lower.
std::size_t kernel_threads();

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

// Has up to `count` helper threads join `task` (each calls task->work() once).
void offer_to_helpers(const std::shared_ptr<Task>& task, std::size_t count);

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
  offer_to_helpers(job, threads - 1);
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
  static void run(const std::shared_ptr<Pipeline>& pipeline);

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

}  // namespace menny
