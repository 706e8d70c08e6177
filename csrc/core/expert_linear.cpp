// The CPU expert's projections: y = x W^T over a range of output rows, blocked so that each
// weight is read from memory once for all tokens. A block of rows and a chunk of columns is
// expanded to an fp32 tile (packed formats) or read in place (fp32), then multiplied by every
// token from L1 with register-blocked dot products.
#include <algorithm>
#include <atomic>
#include <cstring>

#include "core/expert_decode.h"
#include "core/expert_kernels.h"

#if EXPERTFLOW_X86_KERNELS
#include <immintrin.h>
#endif

namespace expertflow::core {
namespace {

constexpr int64_t kChunk = 512;     // columns per tile
constexpr int64_t kRowBlock = 4;    // rows per tile (row-major weights)
constexpr int64_t kRowBlockT = 16;  // rows per tile (transposed float weights)
constexpr int64_t kTokenBlock = 3;  // tokens per microkernel call

// y[t * ldy + r] += sum_j tile[r * ldt + j] * x[t * ldx + j]: portable.
void dot_scalar(const float* tile, int64_t ldt, int64_t nr, const float* x, int64_t ldx, int64_t nt,
                int64_t kc, float* y, int64_t ldy) {
  for (int64_t r = 0; r < nr; ++r) {
    for (int64_t t = 0; t < nt; ++t) {
      float s = 0.0f;
      for (int64_t j = 0; j < kc; ++j) s += tile[r * ldt + j] * x[t * ldx + j];
      y[t * ldy + r] += s;
    }
  }
}

#if EXPERTFLOW_X86_KERNELS
EXPERTFLOW_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int R, int T>
EXPERTFLOW_AVX2 void dot_block(const float* tile, int64_t ldt, const float* x, int64_t ldx,
                               int64_t kc, float* y, int64_t ldy) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  }
  int64_t j = 0;
  for (; j + 8 <= kc; j += 8) {
    __m256 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(x + t * ldx + j);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_loadu_ps(tile + r * ldt + j);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) {
      float s = hsum(acc[r][t]);
      for (int64_t k = j; k < kc; ++k) s += tile[r * ldt + k] * x[t * ldx + k];
      y[t * ldy + r] += s;
    }
  }
}

using DotFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);

template <int R>
constexpr DotFn kDotRow[kTokenBlock] = {&dot_block<R, 1>, &dot_block<R, 2>, &dot_block<R, 3>};
constexpr const DotFn* kDot[kRowBlock] = {kDotRow<1>, kDotRow<2>, kDotRow<3>, kDotRow<4>};

EXPERTFLOW_AVX2 void dot_avx2(const float* tile, int64_t ldt, int64_t nr, const float* x,
                              int64_t ldx, int64_t nt, int64_t kc, float* y, int64_t ldy) {
  // Tokens in near-equal blocks of at most kTokenBlock (16 = 3+3+3+3+2+2, not 3*5+1).
  const int64_t blocks = (nt + kTokenBlock - 1) / kTokenBlock;
  for (int64_t r = 0; r < nr; r += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, nr - r);
    for (int64_t b = 0, t = 0; b < blocks; ++b) {
      const int64_t toks = nt / blocks + (b < nt % blocks ? 1 : 0);
      kDot[rows - 1][toks - 1](tile + r * ldt, ldt, x + t * ldx, ldx, kc, y + t * ldy + r, ldy);
      t += toks;
    }
  }
}

bool detect_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
#endif

int64_t row_block(const PackedWeight& w) { return w.transposed ? kRowBlockT : kRowBlock; }

}  // namespace

namespace {
std::atomic<bool> force_portable{false};
}  // namespace

void expert_kernels_force_portable(bool portable) { force_portable.store(portable); }

bool expert_kernels_use_avx2() {
#if EXPERTFLOW_X86_KERNELS
  static const bool avx2 = detect_avx2();
  return avx2 && !force_portable.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

int64_t linear_row_block(const PackedWeight& w) { return row_block(w); }

int64_t linear_workspace_floats(const PackedWeight& w) { return row_block(w) * kChunk; }

void linear_rows(const PackedWeight& w, const float* x, int64_t ldx, int64_t tokens, int64_t r0,
                 int64_t r1, float* y, int64_t ldy, float* workspace) {
  const bool avx2 = expert_kernels_use_avx2();
#if EXPERTFLOW_X86_KERNELS
  if (avx2 && detail::direct_path_fits(w, tokens)) {
    detail::linear_rows_direct_avx2(w, x, ldx, tokens, r0, r1, y, ldy);
    return;
  }
#endif
  for (int64_t t = 0; t < tokens; ++t) std::fill(y + t * ldy + r0, y + t * ldy + r1, 0.0f);
  // fp32 rows are multiplied where they lie; everything else goes through the tile.
  const bool in_place = w.format == WeightFormat::kF32 && !w.transposed;
  const int64_t block = row_block(w);
  for (int64_t rb = r0; rb < r1; rb += block) {
    const int64_t nr = std::min(block, r1 - rb);
    for (int64_t k0 = 0; k0 < w.in; k0 += kChunk) {
      const int64_t kc = std::min(kChunk, w.in - k0);
      const float* tile = workspace;
      int64_t ldt = kChunk;
      if (in_place) {
        tile = static_cast<const float*>(w.data) + rb * w.in + k0;
        ldt = w.in;
      } else {
#if EXPERTFLOW_X86_KERNELS
        if (avx2) {
          detail::decode_tile_avx2(w, rb, nr, k0, kc, workspace, kChunk);
        } else {
          detail::decode_tile_scalar(w, rb, nr, k0, kc, workspace, kChunk);
        }
#else
        detail::decode_tile_scalar(w, rb, nr, k0, kc, workspace, kChunk);
#endif
      }
#if EXPERTFLOW_X86_KERNELS
      if (avx2) {
        dot_avx2(tile, ldt, nr, x + k0, ldx, tokens, kc, y + rb, ldy);
        continue;
      }
#endif
      dot_scalar(tile, ldt, nr, x + k0, ldx, tokens, kc, y + rb, ldy);
    }
  }
}

}  // namespace expertflow::core
