// CPU dequantize kernels: plain loops over the rows of a weight (at::parallel_for), written so
// that the compiler vectorises them; each row range is compiled twice, for x86-64 baseline and
// for AVX2 (picked at run time), as torch's own wheels must run on CPUs without AVX2.
// Every output is one float32 product `decoded code * scale` rounded once to the output dtype,
// as the references in python/expertflow/formats compute it (float32, then .to(dtype)).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "ops/dequant.h"
#include "ops/dequant_decode.h"

namespace expertflow::ops {
namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The loops are also compiled for AVX2 (no "fma": a contracted `a * b + c` would round
// differently from torch), picked at run time.
#define EF_HAVE_AVX2_CLONE 1
#else
#define EF_HAVE_AVX2_CLONE 0
#endif

// Elements per parallel task: enough work to amortise waking a thread.
constexpr int64_t kGrainElems = 1 << 16;

// float32 -> bfloat16 bits, round to nearest even (as torch's .to()), NaN -> 0x7FC0. Integer
// operations only, so the loops vectorise (c10::BFloat16's constructor branches on NaN).
inline uint16_t bf16_bits(float value) {
  const uint32_t x = bits_from_float(value);
  const uint32_t rounded = (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((x & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

// float32 -> float16 bits, round to nearest even, overflow to inf, NaN -> 0x7E00 with its sign
// (as c10::Half, which the compiler does not vectorise).
inline uint16_t half_bits(float value) {
  const uint32_t x = bits_from_float(value);
  const uint32_t a = x & 0x7FFFFFFFu;
  // Normal results (|v| >= 2^-14): exponent bias 127 -> 15, drop 13 mantissa bits, ties to even;
  // a carry out of the mantissa moves to the next binade, as it should.
  const uint32_t normal = (a - (112u << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  // Subnormal results: adding 0.5 makes the float32 adder round |v| to a multiple of 2^-24 (the
  // float16 subnormal step), ties to even; the low bits then count those steps.
  const uint32_t subnormal = bits_from_float(float_from_bits(a) + 0.5f) - 0x3F000000u;
  uint32_t h = a < (113u << 23) ? subnormal : normal;
  h = a >= 0x477FF000u ? 0x7C00u : h;  // |v| >= 65520 rounds to inf
  h = a > 0x7F800000u ? 0x7E00u : h;
  return static_cast<uint16_t>(h | ((x >> 16) & 0x8000u));
}

// Output conversions, storing raw bits: the compiler vectorises stores of uint16_t, not of
// c10::BFloat16 / c10::Half objects.
struct ToFloat {
  using T = float;
  static T cvt(float v) { return v; }
};
struct ToBFloat16 {
  using T = uint16_t;
  static T cvt(float v) { return bf16_bits(v); }
};
struct ToHalf {
  using T = uint16_t;
  static T cvt(float v) { return half_bits(v); }
};

// Fresh outputs of hundreds of MB: page faults on first touch cost more than the decoding. Ask
// for 2 MiB pages (transparent huge pages in "madvise" mode): on the 2-core build VM a 235 MB
// output is allocated and filled 2.4x faster with this advice. Advice only: failure is harmless,
// and the aligned range lies inside this allocation.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

// Every fp8 e4m3fn code decoded once (NaN codes included): a table lookup vectorises to a
// gather, ~1.5x faster here than the branch-free decode, whose byte-wide selects GCC widens to
// 32 bits in many steps.
const std::array<float, 256> kFp8Values = [] {
  std::array<float, 256> table{};
  for (int code = 0; code < 256; ++code) table[code] = fp8_e4m3(static_cast<uint8_t>(code));
  return table;
}();

struct Int8Rows {
  const int8_t* q;     // [rows, in]
  const float* scale;  // [rows]
  int64_t in;
};

struct Int4Rows {
  const uint8_t* packed;  // [rows, in / 2]
  const float* scale;     // [rows, in / group]
  int64_t in, group;
};

struct Fp8BlockRows {
  const uint8_t* weight;   // [rows, in], e4m3fn bytes
  const float* scale_inv;  // [ceil(rows / block_rows), ceil(in / block_cols)]
  int64_t in, block_rows, block_cols;
};

struct Mxfp4Rows {
  const uint8_t* blocks;  // [rows, nblocks, 16]
  const uint8_t* scales;  // [rows, nblocks], e8m0
  int64_t nblocks;
};

namespace baseline {
#define EF_ROWS_TARGET
#include "ops/dequant_cpu_rows.h"
#undef EF_ROWS_TARGET
}  // namespace baseline

#if EF_HAVE_AVX2_CLONE
namespace avx2 {
#define EF_ROWS_TARGET __attribute__((target("avx2")))
#include "ops/dequant_cpu_rows.h"
#undef EF_ROWS_TARGET
}  // namespace avx2

// ATEN_CPU_CAPABILITY=default, torch's switch to its baseline kernels, selects ours too (that is
// also how the tests reach the baseline loops on an AVX2 machine).
bool use_avx2() {
  static const bool use = [] {
    const char* capability = std::getenv("ATEN_CPU_CAPABILITY");
    if (capability != nullptr && std::string_view(capability) == "default") return false;
    return static_cast<bool>(__builtin_cpu_supports("avx2"));
  }();
  return use;
}
#endif

// Runs `rows` over [0, num_rows) in parallel into a new [num_rows, row_elems] tensor of dtype.
template <typename Rows>
at::Tensor run_rows(const Rows& rows, int64_t num_rows, int64_t row_elems,
                    const at::TensorOptions& opts) {
  at::Tensor out = at::empty({num_rows, row_elems}, opts);
  if (out.numel() == 0) return out;
  advise_huge_pages(out.mutable_data_ptr(), out.nbytes());
  const int64_t grain = std::max<int64_t>(1, kGrainElems / row_elems);
  using Fn = void (*)(const Rows&, void*, int64_t, int64_t);
  Fn fn = &baseline::rows<ToFloat>;
  if (out.scalar_type() == at::kBFloat16) fn = &baseline::rows<ToBFloat16>;
  if (out.scalar_type() == at::kHalf) fn = &baseline::rows<ToHalf>;
#if EF_HAVE_AVX2_CLONE
  if (use_avx2()) {
    fn = &avx2::rows<ToFloat>;
    if (out.scalar_type() == at::kBFloat16) fn = &avx2::rows<ToBFloat16>;
    if (out.scalar_type() == at::kHalf) fn = &avx2::rows<ToHalf>;
  }
#endif
  void* dst = out.mutable_data_ptr();
  at::parallel_for(0, num_rows, grain, [&](int64_t r0, int64_t r1) { fn(rows, dst, r0, r1); });
  return out;
}

}  // namespace

at::Tensor dequantize_int8_cpu(const at::Tensor& q, const at::Tensor& scale, at::ScalarType dtype) {
  check_int8_args(q, scale, dtype);
  const at::Tensor qc = q.contiguous();
  const at::Tensor sc = scale.contiguous();
  const Int8Rows rows{qc.const_data_ptr<int8_t>(), sc.const_data_ptr<float>(), qc.size(1)};
  return run_rows(rows, qc.size(0), qc.size(1), q.options().dtype(dtype));
}

at::Tensor dequantize_int4_cpu(const at::Tensor& packed, const at::Tensor& scale,
                               int64_t group_size, at::ScalarType dtype) {
  check_int4_args(packed, scale, group_size, dtype);
  const at::Tensor pc = packed.contiguous();
  const at::Tensor sc = scale.contiguous();
  const int64_t in = pc.size(1) * 2;
  const Int4Rows rows{pc.const_data_ptr<uint8_t>(), sc.const_data_ptr<float>(), in, group_size};
  return run_rows(rows, pc.size(0), in, packed.options().dtype(dtype));
}

at::Tensor dequantize_fp8_block_cpu(const at::Tensor& weight, const at::Tensor& scale_inv,
                                    int64_t block_rows, int64_t block_cols, at::ScalarType dtype) {
  check_fp8_block_args(weight, scale_inv, block_rows, block_cols, dtype);
  const at::Tensor wc = weight.contiguous();
  const at::Tensor sc = scale_inv.contiguous();
  const Fp8BlockRows rows{static_cast<const uint8_t*>(wc.const_data_ptr()),
                          sc.const_data_ptr<float>(), wc.size(1), block_rows, block_cols};
  return run_rows(rows, wc.size(0), wc.size(1), weight.options().dtype(dtype));
}

at::Tensor dequantize_mxfp4_cpu(const at::Tensor& blocks, const at::Tensor& scales,
                                at::ScalarType dtype) {
  check_mxfp4_args(blocks, scales, dtype);
  const at::Tensor bc = blocks.contiguous();
  const at::Tensor sc = scales.contiguous();
  const Mxfp4Rows rows{bc.const_data_ptr<uint8_t>(), sc.const_data_ptr<uint8_t>(), bc.size(1)};
  return run_rows(rows, bc.size(0), bc.size(1) * kMxfp4Block, blocks.options().dtype(dtype));
}

TORCH_LIBRARY_IMPL(expertflow, CPU, m) {
  m.impl("dequantize_int8", &dequantize_int8_cpu);
  m.impl("dequantize_int4", &dequantize_int4_cpu);
  m.impl("dequantize_fp8_block", &dequantize_fp8_block_cpu);
  m.impl("dequantize_mxfp4", &dequantize_mxfp4_cpu);
}

}  // namespace expertflow::ops
