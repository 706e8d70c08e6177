// Torch-free kernels of the CPU expert (expertflow::cpu_expert): a weight read where it lies in
// the host store, in any expert format, multiplied by a few tokens with fp32 accumulation.
//
// A weight is a logical [out, in] matrix. Packed formats hold it row-major [out, in] (the
// formats' orientation); the float formats may hold it transposed, row-major [in, out] (the
// module's is_transposed). The caller splits the output rows between threads (linear_rows on
// disjoint row ranges); every routine here is single-threaded and reentrant.
//
// x86-64 builds carry an AVX2+FMA+F16C path picked at load time where the CPU has it, and a
// portable scalar path; both give the same sums up to fp32 summation order.
#pragma once

#include <cstddef>
#include <cstdint>

namespace expertflow::core {

enum class WeightFormat : int8_t { kF32, kBF16, kF16, kInt8, kInt4, kFp8, kMxfp4 };

// One weight's packed tensors (raw pointers into the host store or a slot).
struct PackedWeight {
  WeightFormat format = WeightFormat::kF32;
  int64_t out = 0;              // logical output rows
  int64_t in = 0;               // logical input columns
  bool transposed = false;      // float formats only: stored [in, out]
  const void* data = nullptr;   // values / codes: f32, bf16, f16 [out, in] (or [in, out]);
                                // int8 [out, in]; int4 uint8 [out, in / 2] (low nibble first);
                                // fp8 e4m3fn [out, in]; mxfp4 uint8 [out, in / 32, 16]
  const void* scale = nullptr;  // int8 f32 [out]; int4 f32 [out, in / group]; fp8 f32
                                // [ceil(out / block_rows), ceil(in / block_cols)];
                                // mxfp4 uint8 e8m0 [out, in / 32]
  int64_t group = 0;            // int4: columns per scale
  int64_t block_rows = 128;     // fp8 scale tile
  int64_t block_cols = 128;
};

// How the up projection's outputs become the down projection's inputs (all in fp32).
enum class Activation : int8_t {
  kSiluGated,      // [gate | up] halves: silu(gate) * up (transformers' default _apply_gate)
  kGeluGated,      // gelu(gate) * up (erf form)
  kGeluTanhGated,  // gelu_tanh(gate) * up
  kGptOss,         // interleaved gate/up pairs: clamped SwiGLU with alpha and limit (GPT-OSS)
  kSilu,           // ungated: act(up)
  kGelu,
  kGeluTanh,
  kRelu,
  kRelu2,  // relu(x)^2 (Nemotron-H)
};

bool activation_is_gated(Activation act);

// Whether the vector path runs on this CPU (AVX2, FMA and F16C) and is not switched off.
bool expert_kernels_use_avx2();

// Tests: run the portable path even where the CPU has AVX2 (not thread-safe against calls in
// flight; set it before them).
void expert_kernels_force_portable(bool portable);

// Output rows that linear_rows should be given at a time (a split at a multiple of this keeps
// each thread's reads whole blocks).
int64_t linear_row_block(const PackedWeight& w);

// Floats of scratch linear_rows needs.
int64_t linear_workspace_floats(const PackedWeight& w);

// y[t * ldy + r] = sum_k W[r, k] * x[t * ldx + k] for t < tokens, r in [r0, r1), fp32 sums.
// `workspace` holds linear_workspace_floats(w) floats.
void linear_rows(const PackedWeight& w, const float* x, int64_t ldx, int64_t tokens, int64_t r0,
                 int64_t r1, float* y, int64_t ldy, float* workspace);

// h[t * inter + i] = act(pre[t * ld_pre + ...]) for t < tokens, i < inter: gated activations
// read 2 * inter pre-activations per token, ungated ones inter. alpha and limit: GPT-OSS only.
void apply_activation(Activation act, const float* pre, int64_t ld_pre, int64_t tokens,
                      int64_t inter, float alpha, float limit, float* h);

// Scalar conversions (exposed for tests and the ops' float handling).
float bf16_to_float(uint16_t v);
float half_to_float(uint16_t v);
float fp8_e4m3_to_float(uint8_t v);

}  // namespace expertflow::core
