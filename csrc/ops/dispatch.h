// The dtypes every expertflow op accepts for activations and logits: fp32, bf16, fp16.
#pragma once

#include <ATen/Dispatch.h>

#define EXPERTFLOW_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                         \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE( \
                         at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
