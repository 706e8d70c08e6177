// The CPU dequantize loops, included twice by dequant_cpu.cpp: once for the x86-64 baseline and
// once with EF_ROWS_TARGET = target("avx2"), each time inside its own namespace (so no inline
// function is shared between the two instruction sets). Hence no include guard.
//
// The innermost loops are separate noinline functions with __restrict pointers and a scalar
// scale: in that shape GCC 12 vectorises them; inlined into the row loops (or marked
// always_inline) it gives up on the float16 conversion ("unsupported data-type float").

template <typename To>
[[gnu::noinline]] EF_ROWS_TARGET void int8_run(const int8_t* __restrict src, float s,
                                               typename To::T* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = To::cvt(static_cast<float>(src[j]) * s);
}

// `bytes` packed bytes of one int4 group: 2 * bytes outputs, low nibble first.
template <typename To>
[[gnu::noinline]] EF_ROWS_TARGET void int4_run(const uint8_t* __restrict src, float s,
                                               typename To::T* __restrict dst, int64_t bytes) {
  for (int64_t k = 0; k < bytes; ++k) {
    dst[2 * k] = To::cvt(int4_low(src[k]) * s);
    dst[2 * k + 1] = To::cvt(int4_high(src[k]) * s);
  }
}

template <typename To>
[[gnu::noinline]] EF_ROWS_TARGET void fp8_run(const uint8_t* __restrict src, float s,
                                              typename To::T* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = To::cvt(kFp8Values[src[j]] * s);
}

// `count` consecutive mxfp4 blocks (16 bytes, one e8m0 scale each) into 32 * count outputs.
template <typename To>
[[gnu::noinline]] EF_ROWS_TARGET void mxfp4_run(const uint8_t* __restrict blocks,
                                                const uint8_t* __restrict scales,
                                                typename To::T* __restrict dst, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const float s = e8m0(scales[i]);
    const uint8_t* b = blocks + i * kMxfp4BlockBytes;
    typename To::T* d = dst + i * kMxfp4Block;
    for (int64_t k = 0; k < kMxfp4BlockBytes; ++k) {
      d[2 * k] = To::cvt(e2m1(b[k] & 0xF) * s);
      d[2 * k + 1] = To::cvt(e2m1(b[k] >> 4) * s);
    }
  }
}

// Row-range drivers: rows [r0, r1) of one op into `out` ([rows, row_elems] of To::T).
template <typename To>
void rows(const Int8Rows& p, void* out, int64_t r0, int64_t r1) {
  auto* dst = static_cast<typename To::T*>(out);
  for (int64_t r = r0; r < r1; ++r) int8_run<To>(p.q + r * p.in, p.scale[r], dst + r * p.in, p.in);
}

template <typename To>
void rows(const Int4Rows& p, void* out, int64_t r0, int64_t r1) {
  auto* dst = static_cast<typename To::T*>(out);
  const int64_t groups = p.in / p.group;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* src = p.packed + r * (p.in / 2);
    const float* s_row = p.scale + r * groups;
    typename To::T* d = dst + r * p.in;
    if (p.group % 2 == 0) {  // groups of whole bytes
      for (int64_t g = 0; g < groups; ++g) {
        int4_run<To>(src + g * (p.group / 2), s_row[g], d + g * p.group, p.group / 2);
      }
    } else {  // odd groups split bytes: element by element
      for (int64_t j = 0; j < p.in; ++j) {
        const uint8_t b = src[j / 2];
        d[j] = To::cvt((j % 2 ? int4_high(b) : int4_low(b)) * s_row[j / p.group]);
      }
    }
  }
}

template <typename To>
void rows(const Fp8BlockRows& p, void* out, int64_t r0, int64_t r1) {
  auto* dst = static_cast<typename To::T*>(out);
  const int64_t tiles = (p.in + p.block_cols - 1) / p.block_cols;
  for (int64_t r = r0; r < r1; ++r) {
    const float* s_row = p.scale_inv + (r / p.block_rows) * tiles;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t begin = t * p.block_cols;
      const int64_t n = std::min(p.in, begin + p.block_cols) - begin;
      fp8_run<To>(p.weight + r * p.in + begin, s_row[t], dst + r * p.in + begin, n);
    }
  }
}

template <typename To>
void rows(const Mxfp4Rows& p, void* out, int64_t r0, int64_t r1) {
  auto* dst = static_cast<typename To::T*>(out);
  // Blocks are contiguous across rows: one run over the whole range.
  const int64_t first = r0 * p.nblocks;
  mxfp4_run<To>(p.blocks + first * kMxfp4BlockBytes, p.scales + first, dst + first * kMxfp4Block,
                (r1 - r0) * p.nblocks);
}
