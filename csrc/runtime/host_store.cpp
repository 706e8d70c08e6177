#include "runtime/host_store.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace expertflow::runtime {
namespace {

LayerLayout layout_of(const std::vector<at::Tensor>& tensors, int32_t layer) {
  LayerLayout layout;
  TORCH_CHECK_VALUE(!tensors.empty(), "HostExpertStore: layer ", layer, " expert 0 has no tensors");
  for (const at::Tensor& t : tensors) {
    TensorLayout tl;
    tl.offset = layout.expert_bytes;
    tl.shape = t.sizes().vec();
    tl.dtype = t.scalar_type();
    tl.nbytes = t.numel() * t.element_size();
    layout.expert_bytes = align_up(tl.offset + tl.nbytes);
    layout.tensors.push_back(std::move(tl));
  }
  return layout;
}

void check_same_layout(const std::vector<at::Tensor>& tensors, const LayerLayout& layout,
                       int32_t layer, int32_t expert) {
  TORCH_CHECK_VALUE(tensors.size() == layout.tensors.size(), "HostExpertStore: layer ", layer,
                    " expert ", expert, " has ", tensors.size(), " tensors, expert 0 has ",
                    layout.tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK_VALUE(tensors[i].sizes().vec() == layout.tensors[i].shape &&
                          tensors[i].scalar_type() == layout.tensors[i].dtype,
                      "HostExpertStore: layer ", layer, " expert ", expert, " tensor ", i, " is ",
                      tensors[i].scalar_type(), tensors[i].sizes(), ", expert 0's is ",
                      layout.tensors[i].dtype, at::IntArrayRef(layout.tensors[i].shape));
  }
}

}  // namespace

std::vector<at::Tensor> view_as_layout(const at::Tensor& bytes, const LayerLayout& layout) {
  std::vector<at::Tensor> views;
  views.reserve(layout.tensors.size());
  for (const TensorLayout& t : layout.tensors) {
    views.push_back(bytes.narrow(0, t.offset, t.nbytes).view(t.dtype).view(t.shape));
  }
  return views;
}

HostExpertStore::HostExpertStore(const std::vector<std::vector<std::vector<at::Tensor>>>& experts,
                                 bool pinned) {
  TORCH_CHECK_VALUE(!experts.empty(), "HostExpertStore: experts must hold at least one layer");
  num_experts_ = static_cast<int32_t>(experts[0].size());
  TORCH_CHECK_VALUE(num_experts_ > 0, "HostExpertStore: layer 0 has no experts");
  int64_t total = 0;
  for (int32_t l = 0; l < static_cast<int32_t>(experts.size()); ++l) {
    TORCH_CHECK_VALUE(static_cast<int32_t>(experts[l].size()) == num_experts_,
                      "HostExpertStore: layer ", l, " has ", experts[l].size(),
                      " experts, layer 0 has ", num_experts_);
    layouts_.push_back(layout_of(experts[l][0], l));
    for (int32_t e = 0; e < num_experts_; ++e) check_same_layout(experts[l][e], layouts_[l], l, e);
    layer_offsets_.push_back(total);
    total += layouts_[l].expert_bytes * num_experts_;
    max_expert_bytes_ = std::max(max_expert_bytes_, layouts_[l].expert_bytes);
  }
  // Over-allocate so that the buffer can start on a 256-byte boundary whatever the allocator.
  const at::Tensor raw =
      at::empty({total + kAlignment}, at::TensorOptions().dtype(at::kByte).pinned_memory(pinned));
  const auto misalignment =
      static_cast<int64_t>(reinterpret_cast<uintptr_t>(raw.data_ptr()) % kAlignment);
  buffer_ = raw.narrow(0, (kAlignment - misalignment) % kAlignment, total);
  for (int32_t l = 0; l < num_layers(); ++l) {
    for (int32_t e = 0; e < num_experts_; ++e) {
      const std::vector<at::Tensor> dst = expert_tensors(l, e);
      for (size_t i = 0; i < dst.size(); ++i) {
        // A meta tensor gives the layout only: the caller fills the bytes through the views
        // (expertflow.from_pretrained streams a checkpoint in without a second host copy).
        if (!experts[l][e][i].is_meta()) dst[i].copy_(experts[l][e][i]);
      }
    }
  }
}

const LayerLayout& HostExpertStore::layout(int32_t layer) const {
  TORCH_CHECK_INDEX(layer >= 0 && layer < num_layers(), "HostExpertStore: layer must be in [0, ",
                    num_layers(), "), got ", layer);
  return layouts_[layer];
}

at::Tensor HostExpertStore::expert_bytes(int32_t layer, int32_t expert) const {
  const LayerLayout& l = layout(layer);
  TORCH_CHECK_INDEX(expert >= 0 && expert < num_experts_, "HostExpertStore: expert must be in [0, ",
                    num_experts_, "), got ", expert);
  return buffer_.narrow(0, layer_offsets_[layer] + expert * l.expert_bytes, l.expert_bytes);
}

std::vector<at::Tensor> HostExpertStore::expert_tensors(int32_t layer, int32_t expert) const {
  return view_as_layout(expert_bytes(layer, expert), layout(layer));
}

}  // namespace expertflow::runtime
