// PYBIND11_MODULE(_C): stateful runtime classes and build facts. Tensor ops are not bound here;
// they are TORCH_LIBRARY operators (registration.cpp), reached through torch.ops.expertflow.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> torch.Tensor

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/cache_policy.h"
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
  if (name == "lru") return EvictionPolicy::kLru;
  if (name == "lfu") return EvictionPolicy::kLfu;
  if (name == "expertflow") return EvictionPolicy::kExpertFlow;
  if (name == "belady") return EvictionPolicy::kBelady;
  if (name == "lrfu") return EvictionPolicy::kLrfu;
  throw py::value_error(
      "policy must be one of 'lru', 'lfu', 'lrfu', 'expertflow', 'belady', got '" + name + "'");
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
          [](CachePolicy& c, int32_t layer, const std::vector<float>& scores) {
            if (static_cast<int32_t>(scores.size()) != c.options().num_experts) {
              throw py::value_error("set_scores: scores must have num_experts=" +
                                    std::to_string(c.options().num_experts) + " entries, got " +
                                    std::to_string(scores.size()));
            }
            c.set_scores(layer, scores.data());
          },
          py::arg("layer"), py::arg("scores"))
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
           py::call_guard<py::gil_scoped_release>())
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

PYBIND11_MODULE(_C, m) {
  m.doc() = "expertflow native extension";
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
}
