// The Python binding of the hybrid copy-or-CPU policy (csrc/core/hybrid_policy.h), registered
// by bindings.cpp's module.
#pragma once

#include <pybind11/pybind11.h>

namespace expertflow::bindings {

void bind_hybrid_policy(pybind11::module_& m);

}  // namespace expertflow::bindings
