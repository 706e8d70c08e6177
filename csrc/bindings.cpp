// PYBIND11_MODULE(_C): stateful runtime classes and build facts. Tensor ops are not bound here;
// they are TORCH_LIBRARY operators (registration.cpp), reached through torch.ops.expertflow.
#include <ATen/ops/empty.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> torch.Tensor

#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/cache_policy.h"
#include "core/path_decoder.h"
#include "core/scheduler.h"
#include "runtime/expert_cache.h"
#include "runtime/host_store.h"

#ifndef EXPERTFLOW_TORCH_VERSION
#error "EXPERTFLOW_TORCH_VERSION must be defined by the build"
#endif

namespace py = pybind11;
using expertflow::core::BudgetMode;
using expertflow::core::CacheOptions;
using expertflow::core::CachePolicy;
using expertflow::core::EvictionPolicy;
using expertflow::core::Load;

namespace {

EvictionPolicy parse_policy(const std::string& name) {
  if (auto policy = expertflow::core::policy_from_name(name)) return *policy;
  std::string names;
  for (auto n : expertflow::core::policy_names()) names += (names.empty() ? "'" : ", '") + std::string(n) + "'";
  throw py::value_error("policy must be one of " + names + ", got '" + name + "'");
}

BudgetMode parse_budget(const std::string& name) {
  if (name == "per_layer") return BudgetMode::kPerLayer;
  if (name == "global") return BudgetMode::kGlobal;
  throw py::value_error("budget must be 'per_layer' or 'global', got '" + name + "'");
}

py::dict stats_dict(const expertflow::core::CacheStats& s) {
  py::dict d;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  d["prefetch_hits"] = s.prefetch_hits;
  d["prefetches"] = s.prefetches;
  d["wasted_prefetches"] = s.wasted_prefetches;
  d["evictions"] = s.evictions;
  d["loads"] = s.loads();
  return d;
}

py::tuple load_tuple(const Load& l) { return py::make_tuple(l.slot, l.layer, l.expert, l.urgent); }

void bind_cache_policy(py::module_& m) {
  py::class_<CachePolicy>(m, "CachePolicy",
                          "Which expert lives in which slot (csrc/core/cache_policy.h).")
      .def(py::init([](int32_t num_layers, int32_t num_experts, int32_t num_slots, int32_t top_k,
                       const std::string& budget, const std::string& policy,
                       std::optional<double> score_weight) {
             CacheOptions o;
             if (score_weight.has_value()) o.score_weight = *score_weight;
             o.num_layers = num_layers;
             o.num_experts = num_experts;
             o.num_slots = num_slots;
             o.top_k = top_k;
             o.budget = parse_budget(budget);
             o.policy = parse_policy(policy);
             return CachePolicy(o);
           }),
           py::arg("num_layers"), py::arg("num_experts"), py::arg("num_slots"), py::arg("top_k"),
           py::arg("budget") = "per_layer", py::arg("policy") = "lru",
           py::arg("score_weight") = std::nullopt)
      .def(
          "set_scores",
          [](CachePolicy& c, int32_t layer, const std::vector<float>& scores,
             const std::optional<std::vector<float>>& reuse) {
            const size_t n = c.options().num_experts;
            for (const auto* given : {&scores, reuse ? &*reuse : nullptr}) {
              if (given != nullptr && given->size() != n) {
                throw py::value_error(std::string("set_scores: ") +
                                      (given == &scores ? "scores" : "reuse") +
                                      " must have num_experts=" + std::to_string(n) +
                                      " entries, got " + std::to_string(given->size()));
              }
            }
            c.set_scores(layer, scores.data(), reuse ? reuse->data() : nullptr);
          },
          py::arg("layer"), py::arg("scores"), py::arg("reuse") = std::nullopt,
          "Eviction scores of one layer's experts; `reuse` (the reuse head's) takes over at "
          "release(layer) (csrc/core/cache_policy.h).")
      .def("set_next_use", &CachePolicy::set_next_use, py::arg("layer"), py::arg("expert"),
           py::arg("tick"))
      .def(
          "prefetch",
          [](CachePolicy& c, int32_t layer, int32_t expert) -> py::object {
            const auto load = c.prefetch(layer, expert);
            return load ? py::object(load_tuple(*load)) : py::none();
          },
          py::arg("layer"), py::arg("expert"),
          "Returns (slot, layer, expert, urgent) of the load to perform, or None.")
      .def(
          "acquire",
          [](CachePolicy& c, int32_t layer, const std::vector<int32_t>& experts) {
            std::vector<int32_t> slots(experts.size());
            std::vector<Load> loads;
            c.acquire(layer, experts.data(), static_cast<int32_t>(experts.size()), slots.data(),
                      loads);
            py::list out;
            for (const Load& l : loads) out.append(load_tuple(l));
            return py::make_tuple(slots, out);
          },
          py::arg("layer"), py::arg("experts"),
          "Returns (slots, loads): each expert's slot and the urgent loads for the misses.")
      .def("loaded", &CachePolicy::loaded, py::arg("slot"))
      .def("release", &CachePolicy::release, py::arg("layer"))
      .def("slot_of", &CachePolicy::slot_of, py::arg("layer"), py::arg("expert"))
      .def("pool_size", &CachePolicy::pool_size, py::arg("layer"))
      .def("stats", [](const CachePolicy& c) { return stats_dict(c.stats()); });
}

void bind_expert_cache(py::module_& m) {
  using expertflow::runtime::ExpertCache;
  using expertflow::runtime::HostExpertStore;
  py::class_<ExpertCache>(m, "ExpertCache", "Native expert cache (csrc/runtime/expert_cache.h).")
      .def(py::init([](const std::vector<std::vector<std::vector<at::Tensor>>>& experts,
                       const std::string& device, int32_t num_slots, int32_t top_k,
                       const std::string& budget, const std::string& policy) {
             at::Device dev(device);
             auto store = std::make_shared<const HostExpertStore>(experts, dev.is_cuda());
             return std::make_unique<ExpertCache>(std::move(store), num_slots, top_k,
                                                  parse_budget(budget), parse_policy(policy), dev);
           }),
           py::arg("experts"), py::arg("device"), py::arg("num_slots"), py::arg("top_k"),
           py::arg("budget") = "per_layer", py::arg("policy") = "lru")
      .def("plan", &ExpertCache::plan, py::arg("layer_scores"), py::arg("per_layer"),
           py::arg("first_layer") = 0, py::arg("min_score") = 0.0f,
           py::arg("reuse_scores") = std::nullopt, py::call_guard<py::gil_scoped_release>())
      .def("prefetch", &ExpertCache::prefetch, py::arg("layer"), py::arg("experts"),
           py::arg("scores") = std::nullopt)
      .def(
          "acquire",
          [](ExpertCache& c, int32_t layer, const std::vector<int32_t>& experts) {
            expertflow::runtime::AcquireResult r;
            {
              // May block while copies in flight land; Python objects are built after.
              py::gil_scoped_release no_gil;
              r = c.acquire(layer, experts);
            }
            return py::make_tuple(r.slots, r.ready_order);
          },
          py::arg("layer"), py::arg("experts"),
          "Returns (slots, ready_order): each expert's slot, and request positions in the order "
          "they become ready (arrived hits, hits in flight, misses).")
      .def("wait", &ExpertCache::wait, py::arg("slot"), py::call_guard<py::gil_scoped_release>())
      .def("views", &ExpertCache::views, py::arg("slot"), py::arg("layer"))
      .def("release", &ExpertCache::release, py::arg("layer"))
      .def("synchronize", &ExpertCache::synchronize, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("num_slots", &ExpertCache::num_slots)
      .def_property_readonly("slot_bytes", &ExpertCache::slot_bytes)
      .def_property_readonly("host_bytes",
                             [](const ExpertCache& c) { return c.store().total_bytes(); })
      .def_property_readonly("host_pinned", [](const ExpertCache& c) { return c.store().pinned(); })
      .def("host_expert", [](const ExpertCache& c, int32_t layer,
                             int32_t expert) { return c.store().expert_tensors(layer, expert); })
      .def("stats", [](const ExpertCache& c) {
        const auto counters = c.counters();
        py::dict d = stats_dict(c.stats());
        d["bytes_copied"] = counters.bytes_copied;
        d["wait_seconds"] = counters.wait_seconds;
        d["late_waits"] = counters.late_waits;
        d["full_pool_waits"] = counters.full_pool_waits;
        return d;
      });
}

}  // namespace

// Runs `solve(bits, num_requests, words)` over paths packed as int64 bitsets [requests, words],
// without the GIL; the core's std::invalid_argument becomes a Python ValueError.
template <typename Solve>
static auto on_packed_paths(const at::Tensor& paths, const char* name, Solve solve) {
  TORCH_CHECK(paths.device().is_cpu() && paths.scalar_type() == at::kLong && paths.dim() == 2 &&
                  paths.size(1) >= 1,
              name, ": paths must be a CPU int64 tensor [requests, words] of packed bits, got ",
              paths.scalar_type(), paths.sizes());
  const at::Tensor packed = paths.contiguous();
  try {
    py::gil_scoped_release no_gil;
    return solve(reinterpret_cast<const uint64_t*>(packed.const_data_ptr<int64_t>()),
                 static_cast<int32_t>(packed.size(0)), static_cast<int32_t>(packed.size(1)));
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}

void bind_scheduler(py::module_& m) {
  m.def(
      "split_two_batches",
      [](const at::Tensor& paths, int32_t first_size) {
        const auto r = on_packed_paths(
            paths, "split_two_batches", [&](const uint64_t* bits, int32_t n, int32_t words) {
              return expertflow::core::split_two_batches(bits, n, words, first_size);
            });
        return py::make_tuple(r.first, r.second, r.cost, r.swaps);
      },
      py::arg("paths"), py::arg("first_size"),
      "Token scheduler (csrc/core/scheduler.h): (first, second, cost, swaps).");
  m.def(
      "regroup_batches",
      [](const at::Tensor& paths, const std::vector<int32_t>& group, int32_t num_groups,
         int32_t max_passes) {
        const auto r = on_packed_paths(paths, "regroup_batches",
                                       [&](const uint64_t* bits, int32_t n, int32_t words) {
                                         return expertflow::core::regroup_batches(
                                             bits, n, words, group, num_groups, max_passes);
                                       });
        return py::make_tuple(r.group, r.cost, r.resplits);
      },
      py::arg("paths"), py::arg("group"), py::arg("num_groups"), py::arg("max_passes"),
      "Token scheduler (csrc/core/scheduler.h): (group, cost, resplits).");
}

// A CPU float32 tensor of `dims` dimensions, made contiguous, or a ValueError naming it.
static at::Tensor float_cpu(const at::Tensor& t, int64_t dims, const std::string& name) {
  if (!t.device().is_cpu() || t.scalar_type() != at::kFloat || t.dim() != dims) {
    std::ostringstream s;
    s << name << " must be a CPU float32 tensor of " << dims << " dimension(s), got "
      << t.scalar_type() << " " << t.sizes() << " on " << t.device();
    throw py::value_error(s.str());
  }
  return t.contiguous();
}

// PathDecoder::extend over rows of new ids, each after its window's cached keys/values
// (None = none): (features [rows, d_model] of each row's last id, each row's keys/values
// [past + new, depth, 2, d_model], fresh tensors: the pasts are not modified).
static std::pair<at::Tensor, std::vector<at::Tensor>> extend_rows(
    const expertflow::core::PathDecoder& dec, const std::vector<std::vector<int64_t>>& ids,
    const std::vector<std::optional<at::Tensor>>& pasts) {
  using NewToken = expertflow::core::PathDecoder::NewToken;
  const auto& s = dec.shape();
  if (ids.size() != pasts.size()) {
    throw py::value_error(
        "PathDecoder.extend_rows: ids and pasts must have one entry per row, "
        "got " +
        std::to_string(ids.size()) + " and " + std::to_string(pasts.size()));
  }
  std::vector<at::Tensor> before(ids.size()), kv(ids.size());
  std::vector<NewToken> tokens;
  std::vector<int64_t> last;  // each row's last new token
  for (size_t r = 0; r < ids.size(); ++r) {
    int64_t cached = 0;
    if (pasts[r].has_value()) {
      before[r] = float_cpu(*pasts[r], 4, "PathDecoder.extend: past");
      cached = before[r].size(0);
      if (before[r].size(1) != s.depth || before[r].size(2) != 2 ||
          before[r].size(3) != s.d_model) {
        std::ostringstream e;
        e << "PathDecoder.extend: past must be [tokens, depth=" << s.depth
          << ", 2, d_model=" << s.d_model << "], got " << before[r].sizes();
        throw py::value_error(e.str());
      }
    }
    const auto count = static_cast<int64_t>(ids[r].size());
    if (count == 0 || cached + count > s.context) {
      throw py::value_error("PathDecoder.extend: a window holds 1 to context (" +
                            std::to_string(s.context) + ") ids, got " + std::to_string(cached) +
                            " cached + " + std::to_string(count) + " new");
    }
    kv[r] = at::empty({cached + count, s.depth, 2, s.d_model}, at::kFloat);
    for (int64_t j = 0; j < count; ++j) {
      tokens.push_back({ids[r][j], static_cast<int32_t>(cached + j), kv[r].data_ptr<float>()});
    }
    last.push_back(static_cast<int64_t>(tokens.size()) - 1);
  }
  at::Tensor all = at::empty({static_cast<int64_t>(tokens.size()), s.d_model}, at::kFloat);
  try {
    py::gil_scoped_release no_gil;
    for (size_t r = 0; r < ids.size(); ++r) {
      if (before[r].defined()) kv[r].narrow(0, 0, before[r].size(0)).copy_(before[r]);
    }
    dec.extend(tokens, all.data_ptr<float>());
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
  at::Tensor features = at::empty({static_cast<int64_t>(ids.size()), s.d_model}, at::kFloat);
  for (size_t r = 0; r < ids.size(); ++r) features[static_cast<int64_t>(r)].copy_(all[last[r]]);
  return {features, kv};
}

void bind_path_decoder(py::module_& m) {
  using expertflow::core::PathDecoder;
  using expertflow::core::PathNetShape;
  using expertflow::core::WeightView;
  py::class_<PathDecoder>(m, "PathDecoder",
                          "One decode step of the path predictor (csrc/core/path_decoder.h).")
      .def(py::init([](const std::map<std::string, at::Tensor>& state, int32_t vocab_size,
                       int32_t context, int32_t d_model, int32_t depth, int32_t heads, int32_t ffn,
                       int32_t outputs, bool use_previous, float norm_eps, int32_t reuse_hidden,
                       int32_t reuse_horizons) {
             std::vector<at::Tensor> kept;  // contiguous float32 copies alive while copied
             std::map<std::string, WeightView> views;
             for (const auto& [name, tensor] : state) {
               if (!tensor.is_floating_point()) continue;
               kept.push_back(tensor.detach().to(at::kCPU, at::kFloat).contiguous());
               views[name] =
                   WeightView{kept.back().const_data_ptr<float>(), kept.back().sizes().vec()};
             }
             const PathNetShape shape{vocab_size, context,      d_model,       depth,
                                      heads,      ffn,          outputs,       use_previous,
                                      norm_eps,   reuse_hidden, reuse_horizons};
             try {
               return PathDecoder(shape, views);
             } catch (const std::invalid_argument& e) {
               throw py::value_error(e.what());
             }
           }),
           py::arg("state"), py::kw_only(), py::arg("vocab_size"), py::arg("context"),
           py::arg("d_model"), py::arg("depth"), py::arg("heads"), py::arg("ffn"),
           py::arg("outputs"), py::arg("use_previous"), py::arg("norm_eps") = 1e-5f,
           py::arg("reuse_hidden") = 0, py::arg("reuse_horizons") = 0)
      .def_property_readonly("has_reuse", &PathDecoder::has_reuse)
      .def(
          "extend",
          [](const PathDecoder& dec, const std::vector<int64_t>& ids,
             const std::optional<at::Tensor>& past) {
            auto [features, kv] = extend_rows(dec, {ids}, {past});
            return py::make_tuple(features[0], kv[0]);
          },
          py::arg("ids"), py::arg("past") = std::nullopt,
          "Runs new ids of a window after its cached keys/values (past [tokens, depth, 2, "
          "d_model], None = none): (features [d_model] of the last id, keys/values of the whole "
          "window so far). `past` is not modified.")
      .def(
          "extend_rows",
          [](const PathDecoder& dec, const std::vector<std::vector<int64_t>>& ids,
             const std::vector<std::optional<at::Tensor>>& pasts) {
            auto [features, kv] = extend_rows(dec, ids, pasts);
            return py::make_tuple(features, kv);
          },
          py::arg("ids"), py::arg("pasts"),
          "extend for many windows at once (each weight read once for all their new ids): "
          "(features [rows, d_model] of each row's last id, each row's keys/values).")
      .def(
          "scores",
          [](const PathDecoder& dec, const at::Tensor& features,
             const std::optional<at::Tensor>& previous, bool with_reuse) -> py::object {
            const auto& s = dec.shape();
            if (with_reuse && !dec.has_reuse()) {
              throw py::value_error(
                  "PathDecoder.scores: with_reuse=True needs a decoder with a reuse head "
                  "(reuse_hidden and reuse_horizons > 0)");
            }
            const at::Tensor x = float_cpu(features, 2, "PathDecoder.scores: features");
            if (x.size(1) != s.d_model) {
              throw py::value_error("PathDecoder.scores: features must be [rows, d_model=" +
                                    std::to_string(s.d_model) + "]");
            }
            at::Tensor before;
            if (previous.has_value()) {
              before = float_cpu(*previous, 2, "PathDecoder.scores: previous");
              if (before.size(0) != x.size(0) || before.size(1) != s.outputs) {
                throw py::value_error(
                    "PathDecoder.scores: previous must be [rows=" + std::to_string(x.size(0)) +
                    ", outputs=" + std::to_string(s.outputs) + "]");
              }
            }
            at::Tensor out = at::empty({x.size(0), s.outputs}, at::kFloat);
            at::Tensor reuse;
            if (with_reuse) reuse = at::empty({x.size(0), s.outputs}, at::kFloat);
            {
              py::gil_scoped_release no_gil;
              dec.scores(x.const_data_ptr<float>(),
                         before.defined() ? before.const_data_ptr<float>() : nullptr,
                         static_cast<int32_t>(x.size(0)), out.data_ptr<float>(),
                         with_reuse ? reuse.data_ptr<float>() : nullptr);
            }
            if (with_reuse) return py::make_tuple(out, reuse);
            return py::cast(out);
          },
          py::arg("features"), py::arg("previous") = std::nullopt, py::arg("with_reuse") = false,
          "features [rows, d_model], previous routing [rows, outputs] (multi-hot; None = "
          "none) -> probabilities [rows, outputs]; with_reuse=True: (probabilities, reuse "
          "scores [rows, outputs]), see csrc/core/path_decoder.h.");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "expertflow native extension";
  m.def(
      "policy_names",
      [] {
        std::vector<std::string> names;
        for (auto n : expertflow::core::policy_names()) names.emplace_back(n);
        return names;
      },
      "The cache's eviction policies, as offload, replay and the command line name them.");
  m.def("build_info", [] {
    py::dict info;
    info["torch_version"] = EXPERTFLOW_TORCH_VERSION;
    info["cuda_kernels"] = static_cast<bool>(EXPERTFLOW_WITH_CUDA);
    info["cuda_version"] = EXPERTFLOW_CUDA_VERSION;
    info["cuda_arch_list"] = EXPERTFLOW_CUDA_ARCH_LIST;
    info["git_revision"] = EXPERTFLOW_GIT_REVISION;
    info["cxx_standard"] = __cplusplus;
    return info;
  });
  bind_cache_policy(m);
  bind_expert_cache(m);
  bind_scheduler(m);
  bind_path_decoder(m);
}
