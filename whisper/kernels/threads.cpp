// Threads: how many the kernels use, the helper threads kept waiting for work, and running a
// Pipeline on them.
#include "threads.h"

#include <sched.h>

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>

namespace menny {

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
void offer_to_helpers(const std::shared_ptr<Task>& task, std::size_t count) {
  Helpers::instance().offer(task, count);
}

void Pipeline::run(const std::shared_ptr<Pipeline>& pipeline) {
  if (kernel_threads() > 1) {
    offer_to_helpers(pipeline, kernel_threads() - 1);
  }
  pipeline->work();
}

}  // namespace menny
