// PYBIND11_MODULE(_C): stateful runtime classes and build facts. Tensor ops are not bound here;
// they are TORCH_LIBRARY operators (registration.cpp), reached through torch.ops.expertflow.
// This file only converts and binds: checks and logic live in csrc/runtime and csrc/core.
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> torch.Tensor

#include <exception>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings_hybrid.h"
#include "core/cache_policy.h"
#include "core/path_decoder.h"
#include "core/scheduler.h"
#include "runtime/expert_cache.h"
#include "runtime/host_store.h"
#include "runtime/packed_paths.h"
#include "runtime/path_decoder_rows.h"

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

// The one place C++ errors become Python ones, for every function of this module: argument
// errors are ValueError, index errors IndexError, whichever layer raised them (the core's std
// exceptions, the runtime's TORCH_CHECK_VALUE/TORCH_CHECK_INDEX). Anything else goes on to
// pybind11's and torch's own translation (e.g. c10::Error: RuntimeError).
void translate_errors(std::exception_ptr error) {
  try {
    std::rethrow_exception(error);
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::IndexError& e) {
    PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
  } catch (const std::out_of_range& e) {
    PyErr_SetString(PyExc_IndexError, e.what());
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::length_error& e) {  // a request larger than what can be held
    PyErr_SetString(PyExc_ValueError, e.what());
  }
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
             o.budget = expertflow::core::parse_budget_mode(budget);
             o.policy = expertflow::core::parse_eviction_policy(policy);
             return CachePolicy(o);
           }),
           py::arg("num_layers"), py::arg("num_experts"), py::arg("num_slots"), py::arg("top_k"),
           py::arg("budget") = "per_layer", py::arg("policy") = "lru",
           py::arg("score_weight") = std::nullopt)
      .def(
          "set_scores",
          [](CachePolicy& c, int32_t layer, const std::vector<float>& scores,
             const std::optional<std::vector<float>>& reuse) {
            c.set_scores(layer, scores,
                         reuse ? std::span<const float>(*reuse) : std::span<const float>());
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
             return std::make_unique<ExpertCache>(
                 std::move(store), num_slots, top_k, expertflow::core::parse_budget_mode(budget),
                 expertflow::core::parse_eviction_policy(policy), dev);
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
      .def("cached", &ExpertCache::cached, py::arg("layer"), py::arg("experts"),
           py::call_guard<py::gil_scoped_release>(),
           "Whether each expert is held (resident or on its way); pins and copies nothing.")
      .def("copies_ahead", &ExpertCache::copies_ahead, py::arg("layer"), py::arg("experts"),
           py::call_guard<py::gil_scoped_release>(),
           "-1 not held, 0 arrived, n >= 1 the n-th of the copies in flight; pins and copies "
           "nothing.")
      .def("wait", &ExpertCache::wait, py::arg("slot"), py::call_guard<py::gil_scoped_release>())
      // views, release and stats take the cache's lock, which a blocking acquire on another
      // thread holds while a copy lands: wait for it without the GIL.
      .def("views", &ExpertCache::views, py::arg("slot"), py::arg("layer"),
           py::call_guard<py::gil_scoped_release>())
      .def("release", &ExpertCache::release, py::arg("layer"),
           py::call_guard<py::gil_scoped_release>())
      .def("synchronize", &ExpertCache::synchronize, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("num_slots", &ExpertCache::num_slots)
      .def_property_readonly("slot_bytes", &ExpertCache::slot_bytes)
      .def_property_readonly("host_bytes",
                             [](const ExpertCache& c) { return c.store().total_bytes(); })
      .def_property_readonly("host_pinned", [](const ExpertCache& c) { return c.store().pinned(); })
      .def("host_expert", [](const ExpertCache& c, int32_t layer,
                             int32_t expert) { return c.store().expert_tensors(layer, expert); })
      .def("stats", [](const ExpertCache& c) {
        expertflow::runtime::ExpertCacheStats snapshot;
        {
          py::gil_scoped_release no_gil;
          snapshot = c.stats();
        }
        py::dict d = stats_dict(snapshot.policy);
        d["bytes_copied"] = snapshot.transfers.bytes_copied;
        d["wait_seconds"] = snapshot.transfers.wait_seconds;
        d["late_waits"] = snapshot.transfers.late_waits;
        d["full_pool_waits"] = snapshot.transfers.full_pool_waits;
        return d;
      });
}

void bind_scheduler(py::module_& m) {
  m.def(
      "split_two_batches",
      [](const at::Tensor& paths, int32_t first_size) {
        expertflow::core::SplitResult r;
        {
          py::gil_scoped_release no_gil;
          r = expertflow::runtime::split_two_batches(paths, first_size);
        }
        return py::make_tuple(r.first, r.second, r.cost, r.swaps);
      },
      py::arg("paths"), py::arg("first_size"),
      "Token scheduler (csrc/core/scheduler.h): (first, second, cost, swaps).");
  m.def(
      "regroup_batches",
      [](const at::Tensor& paths, const std::vector<int32_t>& group, int32_t num_groups,
         int32_t max_passes) {
        expertflow::core::RegroupResult r;
        {
          py::gil_scoped_release no_gil;
          r = expertflow::runtime::regroup_batches(paths, group, num_groups, max_passes);
        }
        return py::make_tuple(r.group, r.cost, r.resplits);
      },
      py::arg("paths"), py::arg("group"), py::arg("num_groups"), py::arg("max_passes"),
      "Token scheduler (csrc/core/scheduler.h): (group, cost, resplits).");
}

void bind_path_decoder(py::module_& m) {
  using expertflow::core::PathDecoder;
  using expertflow::core::PathNetShape;
  py::class_<PathDecoder>(m, "PathDecoder",
                          "One decode step of the path predictor (csrc/core/path_decoder.h).")
      .def(py::init([](const std::map<std::string, at::Tensor>& state, int32_t vocab_size,
                       int32_t context, int32_t d_model, int32_t depth, int32_t heads, int32_t ffn,
                       int32_t outputs, bool use_previous, float norm_eps, int32_t reuse_hidden,
                       int32_t reuse_horizons) {
             const PathNetShape shape{vocab_size, context,      d_model,       depth,
                                      heads,      ffn,          outputs,       use_previous,
                                      norm_eps,   reuse_hidden, reuse_horizons};
             return expertflow::runtime::make_path_decoder(shape, state);
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
            expertflow::runtime::ExtendedRows r;
            {
              py::gil_scoped_release no_gil;
              r = expertflow::runtime::extend_rows(dec, {ids}, {past});
            }
            return py::make_tuple(r.features[0], r.kv[0]);
          },
          py::arg("ids"), py::arg("past") = std::nullopt,
          "Runs new ids of a window after its cached keys/values (past [tokens, depth, 2, "
          "d_model], None = none): (features [d_model] of the last id, keys/values of the whole "
          "window so far). `past` is not modified.")
      .def(
          "extend_rows",
          [](const PathDecoder& dec, const std::vector<std::vector<int64_t>>& ids,
             const std::vector<std::optional<at::Tensor>>& pasts) {
            expertflow::runtime::ExtendedRows r;
            {
              py::gil_scoped_release no_gil;
              r = expertflow::runtime::extend_rows(dec, ids, pasts);
            }
            return py::make_tuple(r.features, r.kv);
          },
          py::arg("ids"), py::arg("pasts"),
          "extend for many windows at once (each weight read once for all their new ids): "
          "(features [rows, d_model] of each row's last id, each row's keys/values).")
      .def(
          "scores",
          [](const PathDecoder& dec, const at::Tensor& features,
             const std::optional<at::Tensor>& previous, bool with_reuse) -> py::object {
            expertflow::runtime::DecoderScores r;
            {
              py::gil_scoped_release no_gil;
              r = expertflow::runtime::decoder_scores(dec, features, previous, with_reuse);
            }
            if (with_reuse) return py::make_tuple(r.probabilities, r.reuse);
            return py::cast(r.probabilities);
          },
          py::arg("features"), py::arg("previous") = std::nullopt, py::arg("with_reuse") = false,
          "features [rows, d_model], previous routing [rows, outputs] (multi-hot; None = "
          "none) -> probabilities [rows, outputs]; with_reuse=True: (probabilities, reuse "
          "scores [rows, outputs]), see csrc/core/path_decoder.h.");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "expertflow native extension";
  py::register_local_exception_translator(translate_errors);
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
  expertflow::bindings::bind_hybrid_policy(m);
}
