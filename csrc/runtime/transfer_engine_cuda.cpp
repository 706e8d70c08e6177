// The CUDA transfer engine: host->device copies on a normal-priority prefetch stream and a
// high-priority urgent stream, one "arrived" event and one "released" event per slot.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <chrono>
#include <utility>
#include <vector>

#include "runtime/transfer_engine.h"

namespace expertflow::runtime {
namespace {

// One CUDA event without timing, destroyed with its owner: a constructor that throws halfway
// through creating a pool's events destroys those already made.
class CudaEvent {
 public:
  CudaEvent() { C10_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming)); }
  CudaEvent(CudaEvent&& other) noexcept : event_(std::exchange(other.event_, nullptr)) {}
  CudaEvent& operator=(CudaEvent&& other) noexcept {
    std::swap(event_, other.event_);
    return *this;
  }
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  // Errors cannot propagate from a destructor; a failed destroy only leaks the event.
  ~CudaEvent() {
    if (event_ != nullptr) (void)cudaEventDestroy(event_);
  }
  cudaEvent_t get() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

class CudaTransferEngine final : public TransferEngine {
 public:
  CudaTransferEngine(const at::Device& device, int32_t num_slots)
      : device_(device),
        prefetch_(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index())),
        urgent_(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device.index())) {
    const c10::cuda::CUDAGuard guard(device_);  // events belong to the current device
    arrived_.reserve(num_slots);
    released_.reserve(num_slots);
    for (int32_t s = 0; s < num_slots; ++s) {
      arrived_.emplace_back();
      released_.emplace_back();
    }
  }

  ~CudaTransferEngine() override {
    const c10::cuda::CUDAGuard guard(device_);
    // Copies still in flight read the host store and write the slots: let them finish before
    // their memory can be freed (the events are destroyed after this body, with the members).
    // Errors cannot propagate from a destructor; ignore them.
    (void)cudaStreamSynchronize(prefetch_.stream());
    (void)cudaStreamSynchronize(urgent_.stream());
  }

  void copy(int32_t slot, const at::Tensor& src, const at::Tensor& dst, bool urgent) override {
    check_slot(slot);
    TORCH_CHECK(src.nbytes() == dst.nbytes(), "TransferEngine.copy: ", src.nbytes(),
                " source bytes for a ", dst.nbytes(), "-byte destination");
    const c10::cuda::CUDAGuard guard(device_);
    const cudaStream_t stream = urgent ? urgent_.stream() : prefetch_.stream();
    // Never overwrite bytes that compute may still be reading.
    C10_CUDA_CHECK(cudaStreamWaitEvent(stream, released_[slot].get(), 0));
    C10_CUDA_CHECK(cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), src.nbytes(),
                                   cudaMemcpyHostToDevice, stream));
    C10_CUDA_CHECK(cudaEventRecord(arrived_[slot].get(), stream));
  }

  bool arrived(int32_t slot) override {
    check_slot(slot);
    const c10::cuda::CUDAGuard guard(device_);
    const cudaError_t status = cudaEventQuery(arrived_[slot].get());
    if (status == cudaErrorNotReady) {
      (void)cudaGetLastError();  // not an error: clear it
      return false;
    }
    C10_CUDA_CHECK(status);
    return true;
  }

  double wait(int32_t slot) override {
    check_slot(slot);
    const c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK(cudaStreamWaitEvent(c10::cuda::getCurrentCUDAStream(device_.index()).stream(),
                                       arrived_[slot].get(), 0));
    return 0.0;  // the GPU waits, not the host
  }

  double block_until_arrived(int32_t slot) override {
    check_slot(slot);
    const c10::cuda::CUDAGuard guard(device_);
    const auto start = std::chrono::steady_clock::now();
    C10_CUDA_CHECK(cudaEventSynchronize(arrived_[slot].get()));
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }

  void release(int32_t slot) override {
    check_slot(slot);
    const c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK(cudaEventRecord(released_[slot].get(),
                                   c10::cuda::getCurrentCUDAStream(device_.index()).stream()));
  }

  void synchronize() override {
    const c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK(cudaStreamSynchronize(prefetch_.stream()));
    C10_CUDA_CHECK(cudaStreamSynchronize(urgent_.stream()));
  }

 private:
  void check_slot(int32_t slot) const {
    TORCH_CHECK_INDEX(slot >= 0 && slot < static_cast<int32_t>(arrived_.size()),
                      "TransferEngine: slot must be in [0, ", arrived_.size(), "), got ", slot);
  }

  at::Device device_;
  c10::cuda::CUDAStream prefetch_;
  c10::cuda::CUDAStream urgent_;
  std::vector<CudaEvent> arrived_;   // [num_slots] recorded after each copy into the slot
  std::vector<CudaEvent> released_;  // [num_slots] recorded when compute is done with the slot
};

}  // namespace

std::unique_ptr<TransferEngine> make_cuda_transfer_engine(const at::Device& device,
                                                          int32_t num_slots) {
  return std::make_unique<CudaTransferEngine>(device, num_slots);
}

}  // namespace expertflow::runtime
