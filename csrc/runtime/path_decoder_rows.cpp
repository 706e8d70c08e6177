#include "runtime/path_decoder_rows.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace expertflow::runtime {
namespace {

// `t` as a contiguous CPU float32 tensor of `dims` dimensions, or a ValueError naming it.
at::Tensor float_cpu(const at::Tensor& t, int64_t dims, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == dims, name,
                    " must be a CPU float32 tensor of ", dims, " dimension(s), got ",
                    t.scalar_type(), " ", t.sizes(), " on ", t.device());
  return t.contiguous();
}

// A window's cached keys/values, checked against the decoder's shape (undefined if none).
at::Tensor checked_past(const core::PathNetShape& s, const std::optional<at::Tensor>& past) {
  if (!past.has_value()) return {};
  at::Tensor kv = float_cpu(*past, 4, "PathDecoder.extend: past");
  TORCH_CHECK_VALUE(kv.size(1) == s.depth && kv.size(2) == 2 && kv.size(3) == s.d_model,
                    "PathDecoder.extend: past must be [tokens, depth=", s.depth,
                    ", 2, d_model=", s.d_model, "], got ", kv.sizes());
  return kv;
}

}  // namespace

core::PathDecoder make_path_decoder(const core::PathNetShape& shape,
                                    const std::map<std::string, at::Tensor>& state) {
  std::vector<at::Tensor> kept;  // contiguous float32 copies, alive while the core copies them
  std::map<std::string, core::WeightView> views;
  for (const auto& [name, tensor] : state) {
    if (!tensor.is_floating_point()) continue;
    kept.push_back(tensor.detach().to(at::kCPU, at::kFloat).contiguous());
    views[name] = core::WeightView{kept.back().const_data_ptr<float>(), kept.back().sizes().vec()};
  }
  return core::PathDecoder(shape, views);
}

ExtendedRows extend_rows(const core::PathDecoder& decoder,
                         const std::vector<std::vector<int64_t>>& ids,
                         const std::vector<std::optional<at::Tensor>>& pasts) {
  const core::PathNetShape& s = decoder.shape();
  TORCH_CHECK_VALUE(ids.size() == pasts.size(),
                    "PathDecoder.extend_rows: ids and pasts must have one entry per row, got ",
                    ids.size(), " and ", pasts.size());
  std::vector<at::Tensor> before(ids.size());
  ExtendedRows out{at::Tensor(), std::vector<at::Tensor>(ids.size())};
  std::vector<core::PathDecoder::NewToken> tokens;
  std::vector<int64_t> last;  // each row's last new token
  for (size_t r = 0; r < ids.size(); ++r) {
    before[r] = checked_past(s, pasts[r]);
    const int64_t cached = before[r].defined() ? before[r].size(0) : 0;
    const auto count = static_cast<int64_t>(ids[r].size());
    TORCH_CHECK_VALUE(count > 0 && cached + count <= s.context,
                      "PathDecoder.extend: a window holds 1 to context (", s.context, ") ids, got ",
                      cached, " cached + ", count, " new");
    out.kv[r] = at::empty({cached + count, s.depth, 2, s.d_model}, at::kFloat);
    if (cached > 0) out.kv[r].narrow(0, 0, cached).copy_(before[r]);
    for (int64_t j = 0; j < count; ++j) {
      tokens.push_back({ids[r][j], static_cast<int32_t>(cached + j), out.kv[r].data_ptr<float>()});
    }
    last.push_back(static_cast<int64_t>(tokens.size()) - 1);
  }
  at::Tensor all = at::empty({static_cast<int64_t>(tokens.size()), s.d_model}, at::kFloat);
  decoder.extend(tokens, all.data_ptr<float>());
  out.features = at::empty({static_cast<int64_t>(ids.size()), s.d_model}, at::kFloat);
  for (size_t r = 0; r < ids.size(); ++r) {
    out.features[static_cast<int64_t>(r)].copy_(all[last[r]]);
  }
  return out;
}

DecoderScores decoder_scores(const core::PathDecoder& decoder, const at::Tensor& features,
                             const std::optional<at::Tensor>& previous, bool with_reuse) {
  const core::PathNetShape& s = decoder.shape();
  TORCH_CHECK_VALUE(!with_reuse || decoder.has_reuse(),
                    "PathDecoder.scores: with_reuse=True needs a decoder with a reuse head "
                    "(reuse_hidden and reuse_horizons > 0)");
  const at::Tensor x = float_cpu(features, 2, "PathDecoder.scores: features");
  TORCH_CHECK_VALUE(x.size(1) == s.d_model,
                    "PathDecoder.scores: features must be [rows, d_model=", s.d_model, "], got ",
                    x.sizes());
  at::Tensor before;
  if (previous.has_value()) {
    before = float_cpu(*previous, 2, "PathDecoder.scores: previous");
    TORCH_CHECK_VALUE(before.size(0) == x.size(0) && before.size(1) == s.outputs,
                      "PathDecoder.scores: previous must be [rows=", x.size(0),
                      ", outputs=", s.outputs, "], got ", before.sizes());
  }
  DecoderScores out;
  out.probabilities = at::empty({x.size(0), s.outputs}, at::kFloat);
  if (with_reuse) out.reuse = at::empty({x.size(0), s.outputs}, at::kFloat);
  decoder.scores(x.const_data_ptr<float>(),
                 before.defined() ? before.const_data_ptr<float>() : nullptr,
                 static_cast<int32_t>(x.size(0)), out.probabilities.data_ptr<float>(),
                 with_reuse ? out.reuse.data_ptr<float>() : nullptr);
  return out;
}

}  // namespace expertflow::runtime
