// The native path decoder (core::PathDecoder) on tensors: weights from a state dict, windows of
// ids with their cached keys/values, scores of feature rows. Arguments are checked here, at the
// boundary (c10::ValueError naming the argument); the core checks ids and positions.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "core/path_decoder.h"

namespace expertflow::runtime {

// A decoder from PathNet's state dict (non-floating entries, e.g. buffers of ids, are skipped;
// the rest are read as float32 on the CPU). Throws std::invalid_argument (from the core) naming
// a missing weight or one of the wrong shape.
core::PathDecoder make_path_decoder(const core::PathNetShape& shape,
                                    const std::map<std::string, at::Tensor>& state);

struct ExtendedRows {
  at::Tensor features;         // float32 [rows, d_model]: each row's last new id's features
  std::vector<at::Tensor> kv;  // [rows] float32 [past + new, depth, 2, d_model], fresh tensors
};

// PathDecoder::extend over rows of new ids (ids[r], 1 or more), each after its window's cached
// keys/values pasts[r] (float32 [past, depth, 2, d_model] on the CPU, or none), at most
// `context` ids per window in all. The pasts are not modified.
ExtendedRows extend_rows(const core::PathDecoder& decoder,
                         const std::vector<std::vector<int64_t>>& ids,
                         const std::vector<std::optional<at::Tensor>>& pasts);

struct DecoderScores {
  at::Tensor probabilities;  // float32 [rows, outputs]
  at::Tensor reuse;          // float32 [rows, outputs] with reuse scores, else undefined
};

// features float32 [rows, d_model], previous float32 [rows, outputs] (multi-hot; none = zeros),
// both on the CPU. with_reuse needs a decoder with a reuse head.
DecoderScores decoder_scores(const core::PathDecoder& decoder, const at::Tensor& features,
                             const std::optional<at::Tensor>& previous, bool with_reuse);

}  // namespace expertflow::runtime
