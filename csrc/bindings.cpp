// PYBIND11_MODULE(_C): stateful runtime classes and build facts. Tensor ops are not bound here;
// they are TORCH_LIBRARY operators (registration.cpp), reached through torch.ops.expertflow.
#include <pybind11/pybind11.h>

#ifndef EXPERTFLOW_TORCH_VERSION
#error "EXPERTFLOW_TORCH_VERSION must be defined by the build"
#endif

namespace py = pybind11;

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
}
