// The CPU transfer engine: one worker thread serves the urgent queue before the prefetch queue
// and memcpy's each job; per-slot generation counters mark arrival.
#include <c10/util/Exception.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

#include "runtime/transfer_engine.h"

namespace expertflow::runtime {
namespace {

class CpuTransferEngine final : public TransferEngine {
 public:
  explicit CpuTransferEngine(int32_t num_slots)
      : issued_(num_slots, 0), arrived_(num_slots, 0), worker_([this] { run(); }) {}

  ~CpuTransferEngine() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    work_.notify_all();
    worker_.join();
  }

  void copy(int32_t slot, const at::Tensor& src, const at::Tensor& dst, bool urgent) override {
    TORCH_CHECK(src.nbytes() == dst.nbytes(), "TransferEngine.copy: ", src.nbytes(),
                " source bytes for a ", dst.nbytes(), "-byte destination");
    TORCH_CHECK(src.is_contiguous() && dst.is_contiguous(), "TransferEngine.copy: contiguous only");
    {
      std::lock_guard<std::mutex> lock(mutex_);
      check_slot(slot);
      // Counted as issued only once queued: a push_back that throws leaves nothing to wait for.
      (urgent ? urgent_ : prefetch_).push_back(Job{slot, issued_[slot] + 1, src, dst});
      ++issued_[slot];
    }
    work_.notify_one();
  }

  bool arrived(int32_t slot) override {
    std::lock_guard<std::mutex> lock(mutex_);
    check_slot(slot);
    return arrived_[slot] >= issued_[slot];
  }

  double wait(int32_t slot) override { return block_until_arrived(slot); }

  double block_until_arrived(int32_t slot) override {
    const auto start = std::chrono::steady_clock::now();
    std::unique_lock<std::mutex> lock(mutex_);
    check_slot(slot);
    done_.wait(lock, [&] { return arrived_[slot] >= issued_[slot]; });
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }

  // CPU compute is synchronous: by the time release() is called the slot is no longer read.
  void release(int32_t slot) override {
    std::lock_guard<std::mutex> lock(mutex_);
    check_slot(slot);
  }

  void synchronize() override {
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return urgent_.empty() && prefetch_.empty() && !busy_; });
  }

 private:
  struct Job {
    int32_t slot;
    int64_t generation;
    at::Tensor src;  // kept alive until the copy is done
    at::Tensor dst;
  };

  void check_slot(int32_t slot) const {
    TORCH_CHECK_INDEX(slot >= 0 && slot < static_cast<int32_t>(issued_.size()),
                      "TransferEngine: slot must be in [0, ", issued_.size(), "), got ", slot);
  }

  void run() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      work_.wait(lock, [&] { return stopping_ || !urgent_.empty() || !prefetch_.empty(); });
      if (urgent_.empty() && prefetch_.empty()) return;  // stopping, nothing left
      std::deque<Job>& queue = urgent_.empty() ? prefetch_ : urgent_;
      Job job = std::move(queue.front());
      queue.pop_front();
      busy_ = true;
      lock.unlock();
      std::memcpy(job.dst.data_ptr(), job.src.data_ptr(), job.src.nbytes());
      lock.lock();
      busy_ = false;
      arrived_[job.slot] = std::max(arrived_[job.slot], job.generation);
      done_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable work_;
  std::condition_variable done_;
  std::deque<Job> urgent_;
  std::deque<Job> prefetch_;
  std::vector<int64_t> issued_;
  std::vector<int64_t> arrived_;
  bool busy_ = false;
  bool stopping_ = false;
  std::thread worker_;  // last: starts once everything above exists
};

}  // namespace

std::unique_ptr<TransferEngine> make_cpu_transfer_engine(int32_t num_slots) {
  return std::make_unique<CpuTransferEngine>(num_slots);
}

std::unique_ptr<TransferEngine> make_transfer_engine(const at::Device& device, int32_t num_slots) {
  if (device.is_cpu()) return make_cpu_transfer_engine(num_slots);
#if EXPERTFLOW_WITH_CUDA
  if (device.is_cuda()) return make_cuda_transfer_engine(device, num_slots);
#endif
  TORCH_CHECK_VALUE(false, "TransferEngine: device must be cpu",
                    EXPERTFLOW_WITH_CUDA ? " or cuda" : " (this build has no CUDA kernels)",
                    ", got ", device);
}

}  // namespace expertflow::runtime
