// Internal to the CPU expert kernels: expanding a tile of a packed weight to fp32.
#pragma once

#include <cstdint>

#include "core/expert_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define EXPERTFLOW_X86_KERNELS 1
#define EXPERTFLOW_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define EXPERTFLOW_X86_KERNELS 0
#define EXPERTFLOW_AVX2
#endif

namespace expertflow::core::detail {

// W[r, k] of the logical [out, in] weight, scales applied.
float weight_at(const PackedWeight& w, int64_t r, int64_t k);

// tile[i * ldt + j] = W[r0 + i, k0 + j] for i < nr, j < kc (portable).
void decode_tile_scalar(const PackedWeight& w, int64_t r0, int64_t nr, int64_t k0, int64_t kc,
                        float* tile, int64_t ldt);

// The most tokens the register path (expert_direct_avx2.cpp) takes.
inline constexpr int64_t kDirectMaxTokens = 4;

#if EXPERTFLOW_X86_KERNELS
// The same with AVX2 (k0 a multiple of 32).
void decode_tile_avx2(const PackedWeight& w, int64_t r0, int64_t nr, int64_t k0, int64_t kc,
                      float* tile, int64_t ldt);

// Whether linear_rows_direct_avx2 takes this weight at this many tokens.
bool direct_path_fits(const PackedWeight& w, int64_t tokens);

// linear_rows for a few tokens, expanding the weights in registers (direct_path_fits).
void linear_rows_direct_avx2(const PackedWeight& w, const float* x, int64_t ldx, int64_t tokens,
                             int64_t r0, int64_t r1, float* y, int64_t ldy);
#endif

}  // namespace expertflow::core::detail
