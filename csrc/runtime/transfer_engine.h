// Copies experts from the host store into device slots on two streams: a normal-priority
// prefetch stream and a higher-priority urgent stream for misses. Each slot has its own
// completion marker, so compute waits for exactly the slot it needs, never for a whole stream.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <vector>

namespace expertflow::runtime {

class TransferEngine {
 public:
  virtual ~TransferEngine() = default;
  // Starts copying src (host bytes) into dst (the slot's bytes, same length). The copy does not
  // begin before the slot's previous contents have been released by compute (see release()).
  virtual void copy(int32_t slot, const at::Tensor& src, const at::Tensor& dst, bool urgent) = 0;
  // Whether the slot's latest copy has arrived; never blocks.
  virtual bool arrived(int32_t slot) = 0;
  // Makes the caller's compute wait for the slot's latest copy: on CUDA the current stream waits
  // on the slot's event (no host block), on the CPU this blocks. Returns host seconds blocked.
  virtual double wait(int32_t slot) = 0;
  // Blocks the host until the slot's latest copy has arrived. Returns host seconds blocked.
  virtual double block_until_arrived(int32_t slot) = 0;
  // Compute has enqueued its last use of the slot: later copies into it wait for that point.
  virtual void release(int32_t slot) = 0;
  // Blocks until every issued copy has arrived.
  virtual void synchronize() = 0;
};

// The engine for `device` with `num_slots` slots: CUDA streams and events for a CUDA device,
// a worker thread with memcpy for the CPU (same semantics, so the CPU tests exercise them).
std::unique_ptr<TransferEngine> make_transfer_engine(const at::Device& device, int32_t num_slots);

std::unique_ptr<TransferEngine> make_cpu_transfer_engine(int32_t num_slots);
#if EXPERTFLOW_WITH_CUDA
std::unique_ptr<TransferEngine> make_cuda_transfer_engine(const at::Device& device,
                                                          int32_t num_slots);
#endif

}  // namespace expertflow::runtime
