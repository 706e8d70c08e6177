#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/expert_decode.h"
#include "core/expert_kernels.h"

namespace expertflow::core {
namespace {

struct Weight {
  PackedWeight w;
  std::vector<uint8_t> data;
  std::vector<float> fscale;
  std::vector<uint8_t> escale;
};

// Random codes in `format` for an [out, in] weight (scales random positive).
Weight random_weight(WeightFormat format, int64_t out, int64_t in, std::mt19937& rng) {
  Weight r;
  PackedWeight& w = r.w;
  w.format = format;
  w.out = out;
  w.in = in;
  w.group = 8;
  w.block_rows = 16;
  w.block_cols = 32;
  r.data.resize(out * in * 4);
  for (auto& b : r.data) b = rng() & 0xFF;
  if (format == WeightFormat::kF32) {
    auto* f = reinterpret_cast<float*>(r.data.data());
    for (int64_t i = 0; i < out * in; ++i) f[i] = static_cast<float>(rng() % 2001) / 1000 - 1;
  }
  if (format == WeightFormat::kBF16 || format == WeightFormat::kF16) {
    auto* h = reinterpret_cast<uint16_t*>(r.data.data());  // keep exponents small and finite
    for (int64_t i = 0; i < out * in; ++i) {
      h[i] = format == WeightFormat::kBF16 ? (h[i] & 0x807F) | 0x3E00 : (h[i] & 0x83FF) | 0x3400;
    }
  }
  if (format == WeightFormat::kFp8) {
    for (auto& b : r.data) b = (b & 0x7F) == 0x7F ? 0x11 : b;  // no NaN codes here
  }
  r.fscale.resize(out * in);
  for (auto& s : r.fscale) s = static_cast<float>(rng() % 100 + 1) / 400;
  r.escale.resize(out * in);
  for (auto& e : r.escale) e = static_cast<uint8_t>(120 + rng() % 10);
  w.data = r.data.data();
  w.scale = format == WeightFormat::kMxfp4 ? static_cast<const void*>(r.escale.data())
                                           : static_cast<const void*>(r.fscale.data());
  return r;
}

void expect_linear_matches(const PackedWeight& w, int64_t tokens, std::mt19937& rng) {
  std::vector<float> x(tokens * w.in);
  for (auto& v : x) v = static_cast<float>(rng() % 2001) / 1000 - 1;
  std::vector<float> y(tokens * w.out, -1.0f);
  std::vector<float> scratch(linear_workspace_floats(w));
  // Two calls on either side of a row-block boundary, as two threads would make them.
  const int64_t mid = std::min(w.out, linear_row_block(w) * 3);
  linear_rows(w, x.data(), w.in, tokens, 0, mid, y.data(), w.out, scratch.data());
  linear_rows(w, x.data(), w.in, tokens, mid, w.out, y.data(), w.out, scratch.data());
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t r = 0; r < w.out; ++r) {
      double want = 0.0;
      double mag = 0.0;
      for (int64_t k = 0; k < w.in; ++k) {
        const double p = static_cast<double>(detail::weight_at(w, r, k)) * x[t * w.in + k];
        want += p;
        mag += std::abs(p);
      }
      ASSERT_NEAR(y[t * w.out + r], want, 1e-5 * (mag + 1)) << "row " << r << " token " << t;
    }
  }
}

class ExpertKernels : public ::testing::TestWithParam<WeightFormat> {};

TEST_P(ExpertKernels, LinearRowsMatchesTheElementDefinition) {
  std::mt19937 rng(3);
  for (bool portable : {false, true}) {  // the vector path (where the CPU has it), the portable
    expert_kernels_force_portable(portable);
    for (const auto& [out, in] :
         {std::pair<int64_t, int64_t>{37, 64}, {21, 288}, {70, 544}, {9, 40}}) {
      // 40 columns: a partial vector at the end of each row (mxfp4 comes in blocks of 32).
      if (in % 32 != 0 && GetParam() == WeightFormat::kMxfp4) continue;
      Weight weight = random_weight(GetParam(), out, in, rng);
      for (int64_t tokens : {1, 2, 3, 4, 5, 7, 16}) {
        SCOPED_TRACE(::testing::Message() << "portable " << portable << " tokens " << tokens
                                          << " shape " << out << "x" << in);
        expect_linear_matches(weight.w, tokens, rng);
      }
    }
  }
  expert_kernels_force_portable(false);
}

TEST_P(ExpertKernels, Int4GroupsOfThirtyTwoAndMore) {
  if (GetParam() != WeightFormat::kInt4) GTEST_SKIP() << "int4 only";
  std::mt19937 rng(9);
  for (int64_t group : {32, 64, 96}) {
    Weight weight = random_weight(WeightFormat::kInt4, 19, 576, rng);
    weight.w.group = group;
    for (int64_t tokens : {1, 4, 7}) expect_linear_matches(weight.w, tokens, rng);
  }
}

TEST_P(ExpertKernels, TransposedFloatWeights) {
  const WeightFormat f = GetParam();
  if (f != WeightFormat::kF32 && f != WeightFormat::kBF16 && f != WeightFormat::kF16) {
    GTEST_SKIP() << "packed formats are never transposed";
  }
  std::mt19937 rng(5);
  Weight weight = random_weight(f, 45, 70, rng);
  weight.w.transposed = true;
  for (bool portable : {false, true}) {
    expert_kernels_force_portable(portable);
    for (int64_t tokens : {1, 4, 7, 16}) expect_linear_matches(weight.w, tokens, rng);
  }
  expert_kernels_force_portable(false);
}

INSTANTIATE_TEST_SUITE_P(Formats, ExpertKernels,
                         ::testing::Values(WeightFormat::kF32, WeightFormat::kBF16,
                                           WeightFormat::kF16, WeightFormat::kInt8,
                                           WeightFormat::kInt4, WeightFormat::kFp8,
                                           WeightFormat::kMxfp4));

TEST(ExpertKernels, ScalarConversions) {
  EXPECT_EQ(bf16_to_float(0x3F80), 1.0f);
  EXPECT_EQ(half_to_float(0x3C00), 1.0f);
  EXPECT_EQ(half_to_float(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(fp8_e4m3_to_float(0x38), 1.0f);
  EXPECT_EQ(fp8_e4m3_to_float(0x7E), 448.0f);
  EXPECT_EQ(fp8_e4m3_to_float(0x01), std::ldexp(1.0f, -9));
  EXPECT_TRUE(std::isnan(fp8_e4m3_to_float(0xFF)));
}

TEST(ExpertKernels, Activations) {
  const std::vector<float> pre = {1.0f, -2.0f, 3.0f, 0.5f};  // one token
  std::vector<float> h(2);
  apply_activation(Activation::kSiluGated, pre.data(), 4, 1, 2, 0, 0, h.data());
  EXPECT_NEAR(h[0], 1.0 / (1 + std::exp(-1.0)) * 3.0, 1e-6);
  apply_activation(Activation::kGptOss, pre.data(), 4, 1, 2, 1.702f, 1.0f, h.data());
  // gate 1 (at the limit), up clamp(-2) = -1: (up + 1) = 0.
  EXPECT_NEAR(h[0], 0.0, 1e-7);
  std::vector<float> u(4);
  apply_activation(Activation::kRelu2, pre.data(), 4, 1, 4, 0, 0, u.data());
  EXPECT_EQ(u[1], 0.0f);
  EXPECT_EQ(u[2], 9.0f);
}

}  // namespace
}  // namespace expertflow::core
