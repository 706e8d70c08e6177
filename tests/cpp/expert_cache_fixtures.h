// Shared by the runtime tests: a host store whose every expert has its own bytes, and a check
// that a slot holds them.
#pragma once

#include <ATen/ops/empty.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "runtime/expert_cache.h"
#include "runtime/host_store.h"

namespace expertflow::runtime::testing {

// The byte at `i` of expert (layer, expert): differs between any two experts at most offsets.
inline uint8_t pattern(int32_t layer, int32_t expert, int64_t i) {
  return static_cast<uint8_t>((layer * 131 + expert * 17 + i * 7 + i / 251) % 251);
}

// One uint8 tensor of `bytes` per expert, filled with its pattern.
inline std::shared_ptr<const HostExpertStore> patterned_store(int32_t layers, int32_t experts,
                                                              int64_t bytes) {
  std::vector<std::vector<std::vector<at::Tensor>>> all(layers);
  for (int32_t l = 0; l < layers; ++l) {
    for (int32_t e = 0; e < experts; ++e) {
      at::Tensor t = at::empty({bytes}, at::kByte);
      uint8_t* p = t.data_ptr<uint8_t>();
      for (int64_t i = 0; i < bytes; ++i) p[i] = pattern(l, e, i);
      all[l].push_back({t});
    }
  }
  return std::make_shared<const HostExpertStore>(all, /*pinned=*/false);
}

// Whether `slot` (waited for) holds expert (layer, expert)'s bytes, as its views show them.
inline ::testing::AssertionResult holds(ExpertCache& cache, int32_t slot, int32_t layer,
                                        int32_t expert) {
  cache.wait(slot);
  const std::vector<at::Tensor> views = cache.views(slot, layer);
  const at::Tensor want = cache.store().expert_bytes(layer, expert);
  const int64_t n = views.at(0).numel();
  if (std::memcmp(views[0].const_data_ptr<uint8_t>(), want.const_data_ptr<uint8_t>(), n) != 0) {
    return ::testing::AssertionFailure()
           << "slot " << slot << " does not hold layer " << layer << " expert " << expert;
  }
  return ::testing::AssertionSuccess();
}

}  // namespace expertflow::runtime::testing
