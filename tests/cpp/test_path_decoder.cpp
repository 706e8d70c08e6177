// The native path decoder on its own; tests/runtime/test_path_decoder.py compares it with the
// torch network it mirrors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/path_decoder.h"

namespace expertflow::core {
namespace {

// Random weights with PathNet's state_dict names and shapes.
struct RandomNet {
  PathNetShape shape;
  std::map<std::string, std::vector<float>> data;
  std::map<std::string, std::vector<int64_t>> shapes;

  RandomNet(PathNetShape s, uint32_t seed) : shape(s) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 0.3f);
    const int64_t d = s.d_model;
    const auto add = [&](const std::string& name, std::vector<int64_t> dims) {
      int64_t n = 1;
      for (int64_t k : dims) n *= k;
      std::vector<float> v(n);
      for (float& x : v) x = normal(rng);
      data[name] = std::move(v);
      shapes[name] = std::move(dims);
    };
    add("embed.weight", {s.vocab_size, d});
    add("position.weight", {s.context, d});
    for (int i = 0; i < s.depth; ++i) {
      const std::string p = "stack.layers." + std::to_string(i) + ".";
      add(p + "self_attn.in_proj_weight", {3 * d, d});
      add(p + "self_attn.in_proj_bias", {3 * d});
      add(p + "self_attn.out_proj.weight", {d, d});
      add(p + "self_attn.out_proj.bias", {d});
      add(p + "linear1.weight", {s.ffn, d});
      add(p + "linear1.bias", {s.ffn});
      add(p + "linear2.weight", {d, s.ffn});
      add(p + "linear2.bias", {d});
      for (const char* n : {"norm1", "norm2"}) {
        add(p + n + ".weight", {d});
        add(p + n + ".bias", {d});
      }
    }
    add("norm.weight", {d});
    add("norm.bias", {d});
    if (s.use_previous) {
      add("previous.weight", {d, s.outputs});
      add("previous.bias", {d});
      add("fuse.0.weight", {2 * d, d});
      add("fuse.0.bias", {2 * d});
      add("fuse.2.weight", {d, 2 * d});
      add("fuse.2.bias", {d});
    }
    add("head.weight", {s.outputs, d});
    add("head.bias", {s.outputs});
    if (s.reuse_hidden > 0) {
      add("reuse.0.weight", {s.reuse_hidden, d});
      add("reuse.0.bias", {s.reuse_hidden});
      add("reuse.2.weight", {s.reuse_horizons * s.outputs, s.reuse_hidden});
      add("reuse.2.bias", {s.reuse_horizons * s.outputs});
    }
  }

  std::map<std::string, WeightView> views() const {
    std::map<std::string, WeightView> v;
    for (const auto& [name, values] : data) v[name] = WeightView{values.data(), shapes.at(name)};
    return v;
  }
};

PathNetShape small_shape(int32_t d_model, int32_t outputs, bool use_previous) {
  PathNetShape s;
  s.vocab_size = 30;
  s.context = 20;
  s.d_model = d_model;
  s.depth = 2;
  s.heads = 2;
  s.ffn = 3 * d_model;
  s.outputs = outputs;
  s.use_previous = use_previous;
  return s;
}

// Rows extended together (the register tiles of 2-4 rows and blocks of 16) give what each row
// gives alone (one-row tiles), for widths with and without a tail of single outputs.
TEST(PathDecoder, RowsTogetherMatchEachRowAlone) {
  for (int32_t d_model : {8, 10, 24}) {
    const RandomNet net(small_shape(d_model, 13, true), 7 + d_model);
    const PathDecoder decoder(net.shape, net.views());
    const int64_t per_token = decoder.kv_floats_per_token();
    std::mt19937 rng(d_model);
    std::uniform_int_distribution<int64_t> id(0, net.shape.vocab_size - 1);
    for (int32_t rows : {1, 2, 3, 5, 18}) {
      // Each row: a window of `length` ids, all new.
      std::vector<std::vector<int64_t>> ids(rows);
      for (auto& r : ids) {
        r.resize(1 + rng() % 6);
        for (int64_t& t : r) t = id(rng);
      }
      std::vector<std::vector<float>> kv_together(rows), kv_alone(rows);
      std::vector<PathDecoder::NewToken> tokens;
      std::vector<size_t> last;
      for (int32_t r = 0; r < rows; ++r) {
        kv_together[r].assign(ids[r].size() * per_token, 0.0f);
        kv_alone[r].assign(ids[r].size() * per_token, 0.0f);
        for (size_t j = 0; j < ids[r].size(); ++j) {
          tokens.push_back({ids[r][j], static_cast<int32_t>(j), kv_together[r].data()});
        }
        last.push_back(tokens.size() - 1);
      }
      std::vector<float> together(tokens.size() * d_model);
      decoder.extend(tokens, together.data());
      for (int32_t r = 0; r < rows; ++r) {
        std::vector<float> alone(d_model);
        for (size_t j = 0; j < ids[r].size(); ++j) {  // one token per call
          decoder.extend({{ids[r][j], static_cast<int32_t>(j), kv_alone[r].data()}}, alone.data());
        }
        for (int32_t i = 0; i < d_model; ++i) {
          EXPECT_NEAR(together[last[r] * d_model + i], alone[i], 1e-5f)
              << "d_model " << d_model << ", rows " << rows << ", row " << r;
        }
        for (size_t i = 0; i < kv_alone[r].size(); ++i) {
          ASSERT_NEAR(kv_together[r][i], kv_alone[r][i], 1e-5f);
        }
      }
      // Scores of all rows at once equal each row's own.
      std::vector<float> features(rows * d_model), previous(rows * 13, 0.0f), all(rows * 13);
      for (int32_t r = 0; r < rows; ++r) {
        std::copy_n(&together[last[r] * d_model], d_model, &features[r * d_model]);
        previous[r * 13 + r % 13] = 1.0f;
      }
      decoder.scores(features.data(), previous.data(), rows, all.data());
      for (int32_t r = 0; r < rows; ++r) {
        std::vector<float> one(13);
        decoder.scores(&features[r * d_model], &previous[r * 13], 1, one.data());
        for (int32_t o = 0; o < 13; ++o) {
          EXPECT_NEAR(all[r * 13 + o], one[o], 1e-6f);
          EXPECT_GT(one[o], 0.0f);
          EXPECT_LT(one[o], 1.0f);
        }
      }
    }
  }
}

// With every stack and head weight zero, the features are the final norm of the embeddings
// and every score is sigmoid(head bias): the arithmetic can be checked by hand.
TEST(PathDecoder, ZeroStackGivesTheNormedEmbedding) {
  RandomNet net(small_shape(4, 3, false), 1);
  for (auto& [name, values] : net.data) {
    if (name.rfind("stack.", 0) == 0 || name == "head.weight")
      std::fill(values.begin(), values.end(), 0.0f);
  }
  net.data["norm.weight"] = {1, 1, 1, 1};
  net.data["norm.bias"] = {0, 0, 0, 0};
  net.data["head.bias"] = {0.0f, 1.0f, -2.0f};
  net.data["embed.weight"][5 * 4 + 0] = 1.0f;  // id 5 at position 0: x = embed + position
  const std::vector<float> x = [&] {
    std::vector<float> v(4);
    for (int i = 0; i < 4; ++i)
      v[i] = net.data["embed.weight"][5 * 4 + i] + net.data["position.weight"][i];
    return v;
  }();
  float mean = 0.0f, var = 0.0f;
  for (float v : x) mean += v / 4;
  for (float v : x) var += (v - mean) * (v - mean) / 4;
  const PathDecoder decoder(net.shape, net.views());
  std::vector<float> kv(decoder.kv_floats_per_token()), features(4), scores(3);
  decoder.extend({{5, 0, kv.data()}}, features.data());
  for (int i = 0; i < 4; ++i) {
    EXPECT_NEAR(features[i], (x[i] - mean) / std::sqrt(var + 1e-5f), 1e-5f);
  }
  decoder.scores(features.data(), nullptr, 1, scores.data());
  EXPECT_NEAR(scores[0], 0.5f, 1e-6f);
  EXPECT_NEAR(scores[1], 1.0f / (1.0f + std::exp(-1.0f)), 1e-6f);
  EXPECT_NEAR(scores[2], 1.0f / (1.0f + std::exp(2.0f)), 1e-6f);
}

// The reuse head by hand: a zero first layer leaves gelu(bias) as the hidden units, so each
// horizon's logit is the second layer applied to those; the reuse score is the mean over
// horizons of their sigmoids. The head does not touch the next-step scores, and rows
// together give what each row gives alone.
TEST(PathDecoder, ReuseHeadIsTheMeanOverHorizonsOfItsProbabilities) {
  PathNetShape shape = small_shape(6, 3, true);
  shape.reuse_hidden = 2;
  shape.reuse_horizons = 4;
  RandomNet net(shape, 5);
  std::fill(net.data["reuse.0.weight"].begin(), net.data["reuse.0.weight"].end(), 0.0f);
  net.data["reuse.0.bias"] = {1.0f, -0.5f};
  const PathDecoder decoder(net.shape, net.views());
  PathNetShape plain_shape = shape;
  plain_shape.reuse_hidden = plain_shape.reuse_horizons = 0;
  const PathDecoder plain(plain_shape, net.views());  // ignores the reuse weights
  EXPECT_TRUE(decoder.has_reuse());
  EXPECT_FALSE(plain.has_reuse());
  const auto gelu = [](float x) { return 0.5f * x * (1.0f + std::erf(x / std::sqrt(2.0f))); };
  const auto bf16 = [](float x) {  // the decoder keeps linear weights as bfloat16 (nearest even)
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    std::memcpy(&x, &bits, 4);
    return x;
  };
  const float hidden[2] = {gelu(1.0f), gelu(-0.5f)};
  const std::vector<float>& w = net.data["reuse.2.weight"];
  const std::vector<float>& b = net.data["reuse.2.bias"];
  std::vector<float> features(2 * 6), previous(2 * 3, 0.0f), scores(6), reuse(6), alone(6);
  std::mt19937 rng(2);
  std::normal_distribution<float> normal;
  for (float& f : features) f = normal(rng);
  previous[1] = previous[3 + 2] = 1.0f;
  decoder.scores(features.data(), previous.data(), 2, scores.data(), reuse.data());
  plain.scores(features.data(), previous.data(), 2, alone.data());
  for (int i = 0; i < 6; ++i) EXPECT_EQ(scores[i], alone[i]);
  for (int o = 0; o < 3; ++o) {
    float mean = 0.0f;
    for (int h = 0; h < 4; ++h) {
      const int row = h * 3 + o;
      const float logit = bf16(w[row * 2]) * hidden[0] + bf16(w[row * 2 + 1]) * hidden[1] + b[row];
      mean += 1.0f / (1.0f + std::exp(-logit)) / 4.0f;
    }
    EXPECT_NEAR(reuse[o], mean, 1e-6f) << o;
    EXPECT_NEAR(reuse[3 + o], mean, 1e-6f) << o;  // the features do not reach it here
  }
  std::vector<float> one_score(3), one_reuse(3);
  decoder.scores(&features[6], &previous[3], 1, one_score.data(), one_reuse.data());
  for (int o = 0; o < 3; ++o) EXPECT_NEAR(one_reuse[o], reuse[3 + o], 1e-6f);
  EXPECT_THROW(plain.scores(features.data(), nullptr, 1, scores.data(), reuse.data()),
               std::invalid_argument);
}

TEST(PathDecoder, RefusesMissingOrMisshapenWeightsAndBadTokens) {
  const RandomNet net(small_shape(8, 5, true), 3);
  auto views = net.views();
  views.erase("fuse.2.bias");
  try {
    PathDecoder(net.shape, views);
    FAIL() << "a missing weight was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("'fuse.2.bias' is missing"), std::string::npos);
  }
  views = net.views();
  views["head.weight"].shape = {5, 4};
  try {
    PathDecoder(net.shape, views);
    FAIL() << "a misshapen weight was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("'head.weight' must be [5, 8], got [5, 4]"),
              std::string::npos);
  }
  PathNetShape odd = net.shape;
  odd.heads = 3;  // 8 % 3 != 0
  EXPECT_THROW(PathDecoder(odd, net.views()), std::invalid_argument);

  const PathDecoder decoder(net.shape, net.views());
  std::vector<float> kv(21 * decoder.kv_floats_per_token()), features(8);
  EXPECT_THROW(decoder.extend({{30, 0, kv.data()}}, features.data()), std::invalid_argument);
  EXPECT_THROW(decoder.extend({{-1, 0, kv.data()}}, features.data()), std::invalid_argument);
  EXPECT_THROW(decoder.extend({{1, 20, kv.data()}}, features.data()), std::invalid_argument);
  EXPECT_THROW(decoder.extend({{1, 0, nullptr}}, features.data()), std::invalid_argument);
  EXPECT_NO_THROW(decoder.extend({{1, 19, kv.data()}}, features.data()));
}

}  // namespace
}  // namespace expertflow::core
