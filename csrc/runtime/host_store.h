// Every routed expert of every layer, packed into one contiguous host buffer (pinned when the
// experts are served to a GPU). The host copy is the source of truth: eviction never copies back.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace expertflow::runtime {

constexpr int64_t kAlignment = 256;  // every expert and every tensor starts 256-byte aligned

inline int64_t align_up(int64_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }

// Where one of an expert's tensors lives inside the expert's bytes.
struct TensorLayout {
  int64_t offset = 0;
  std::vector<int64_t> shape;
  at::ScalarType dtype = at::kFloat;
  int64_t nbytes = 0;
};

// All experts of one layer share a layout (same tensors, shapes and dtypes).
struct LayerLayout {
  std::vector<TensorLayout> tensors;
  int64_t expert_bytes = 0;  // aligned
};

class HostExpertStore {
 public:
  // experts[layer][expert] = that expert's tensors (e.g. gate_up_proj, down_proj). Their bytes
  // are copied into the store; the store keeps no reference to the inputs. Meta tensors give
  // only the layout: those bytes stay uninitialised until written through expert_tensors().
  HostExpertStore(const std::vector<std::vector<std::vector<at::Tensor>>>& experts, bool pinned);

  int32_t num_layers() const { return static_cast<int32_t>(layouts_.size()); }
  int32_t num_experts() const { return num_experts_; }
  const LayerLayout& layout(int32_t layer) const;
  int64_t max_expert_bytes() const { return max_expert_bytes_; }
  int64_t total_bytes() const { return buffer_.numel(); }
  bool pinned() const { return buffer_.is_pinned(); }
  // uint8 [expert_bytes(layer)]: the packed bytes of one expert.
  at::Tensor expert_bytes(int32_t layer, int32_t expert) const;
  // The expert's tensors, as views of the store.
  std::vector<at::Tensor> expert_tensors(int32_t layer, int32_t expert) const;

 private:
  std::vector<LayerLayout> layouts_;
  std::vector<int64_t> layer_offsets_;  // [num_layers] where layer's expert 0 starts
  int32_t num_experts_ = 0;
  int64_t max_expert_bytes_ = 0;
  at::Tensor buffer_;  // uint8 [total]
};

// Views of `bytes` (uint8, at least layout.expert_bytes long) as the layout's tensors.
std::vector<at::Tensor> view_as_layout(const at::Tensor& bytes, const LayerLayout& layout);

}  // namespace expertflow::runtime
