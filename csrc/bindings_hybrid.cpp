// _C.HybridPolicy: the per-miss copy-or-CPU decision of csrc/core/hybrid_policy.h, with
// misses and hits passed as tuples and placements returned as 'copy' / 'cpu'.
#include "bindings_hybrid.h"

#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "core/hybrid_policy.h"

namespace py = pybind11;

namespace expertflow::bindings {
namespace {

const char* placement_name(expertflow::core::MissPlacement p) {
  return p == expertflow::core::MissPlacement::kCpu ? "cpu" : "copy";
}

using MissTuple = std::tuple<int64_t, int64_t, int64_t, double>;

std::vector<expertflow::core::ExpertMiss> as_misses(const std::vector<MissTuple>& tuples) {
  std::vector<expertflow::core::ExpertMiss> out;
  out.reserve(tuples.size());
  for (const auto& [t, b, n, r] : tuples) out.push_back(expertflow::core::ExpertMiss{t, b, n, r});
  return out;
}

}  // namespace

void bind_hybrid_policy(py::module_& m) {
  using expertflow::core::ExpertMiss;
  using expertflow::core::HybridPolicy;
  using expertflow::core::HybridRates;
  py::class_<HybridPolicy>(m, "HybridPolicy",
                           "Copy or compute on the CPU, per missed expert "
                           "(csrc/core/hybrid_policy.h).")
      .def(py::init([](double link_gbps, double cpu_gbps, double cpu_gflops, double cpu_overhead_ms,
                       double device_gbps) {
             return HybridPolicy(
                 HybridRates{link_gbps, cpu_gbps, cpu_gflops, cpu_overhead_ms, device_gbps});
           }),
           py::arg("link_gbps"), py::arg("cpu_gbps"), py::arg("cpu_gflops"),
           py::arg("cpu_overhead_ms") = 0.0, py::arg("device_gbps") = 0.0)
      .def_property_readonly("link_gbps", [](const HybridPolicy& p) { return p.rates().link_gbps; })
      .def_property_readonly("cpu_gbps", [](const HybridPolicy& p) { return p.rates().cpu_gbps; })
      .def_property_readonly("cpu_gflops",
                             [](const HybridPolicy& p) { return p.rates().cpu_gflops; })
      .def_property_readonly("device_gbps",
                             [](const HybridPolicy& p) { return p.rates().device_gbps; })
      .def(
          "decide",
          [](const HybridPolicy& p, int64_t tokens, int64_t packed_bytes, int64_t params,
             double reuse, double link_busy_ms, double cpu_busy_ms, double device_busy_ms) {
            const auto d = p.decide(ExpertMiss{tokens, packed_bytes, params, reuse}, link_busy_ms,
                                    cpu_busy_ms, device_busy_ms);
            return py::make_tuple(placement_name(d.placement), d.copy_ms, d.cpu_ms);
          },
          py::arg("tokens"), py::arg("packed_bytes"), py::arg("params"), py::arg("reuse") = 0.0,
          py::arg("link_busy_ms") = 0.0, py::arg("cpu_busy_ms") = 0.0,
          py::arg("device_busy_ms") = 0.0, "One miss: ('copy' | 'cpu', copy_ms, cpu_ms).")
      .def(
          "plan",
          [](const HybridPolicy& p, const std::vector<MissTuple>& misses) {
            std::vector<std::string> out;
            for (const auto& d : p.plan_misses(as_misses(misses))) {
              out.emplace_back(placement_name(d.placement));
            }
            return out;
          },
          py::arg("misses"),
          "A step's misses [(tokens, packed_bytes, params, reuse), ...] in order, each decided "
          "with the link and CPU queues the earlier ones left: ['copy' | 'cpu', ...].")
      .def(
          "plan_step",
          [](const HybridPolicy& p, const std::vector<MissTuple>& hits,
             const std::vector<MissTuple>& misses) {
            std::vector<ExpertMiss> held;
            held.reserve(hits.size());
            for (const auto& [t, b, n, wait] : hits) held.push_back(ExpertMiss{t, b, n, 0.0, wait});
            const auto plan = p.plan_step(held, as_misses(misses));
            std::vector<std::string> on_hits, on_misses;
            for (size_t i = 0; i < plan.size(); ++i) {
              (i < hits.size() ? on_hits : on_misses)
                  .emplace_back(placement_name(plan[i].placement));
            }
            return py::make_tuple(on_hits, on_misses);
          },
          py::arg("hits"), py::arg("misses"),
          "A step's cached experts, each (tokens, packed_bytes, params, wait_ms: until its copy "
          "lands), and misses, each (tokens, packed_bytes, params, reuse), decided in order with "
          "the link, CPU and device queues the earlier ones left: (['copy' (use the slot) | "
          "'cpu', ...] for the hits, ['copy' | 'cpu', ...] for the misses).");
}

}  // namespace expertflow::bindings
