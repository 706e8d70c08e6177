// One decode step of the routing path predictor (python/expertflow/prediction/path/net.py, PathNet)
// without torch: token + position embeddings, a pre-norm causal transformer stack reading
// cached keys/values, and the head that scores every (layer, expert).
//
// Why native: at one token per step the network is a few hundred thousand multiply-adds,
// which take tens of microseconds; run op by op through torch, the same step costs about a
// millisecond of per-op dispatch (README, "Routing predictor": the cost target is < 10% of
// a decode step of the model served).
//
// The linear layers' weights are kept as bfloat16 (rounded to nearest even, as torch rounds):
// at batch 1 the step reads every weight once per token, megabytes that do not stay in L2,
// so half the bytes is most of the remaining time. Everything is computed in float32;
// PathPredictor rounds its network's weights the same way, so both backends agree.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace expertflow::core {

// Sizes of the network, as in PathNet's constructor.
struct PathNetShape {
  int32_t vocab_size = 0;
  int32_t context = 0;  // positions embedded: a window holds at most this many ids
  int32_t d_model = 0;
  int32_t depth = 0;          // transformer layers
  int32_t heads = 0;          // d_model % heads == 0
  int32_t ffn = 0;            // feed-forward width (4 * d_model in PathNet)
  int32_t outputs = 0;        // num_layers * num_experts of the model served
  bool use_previous = false;  // the head also reads the previous token's routing
  float norm_eps = 1e-5f;
  // The optional reuse head (0, 0: none): an MLP of this hidden width on the head's input
  // giving, for each of `reuse_horizons` horizons, a logit per output that the (layer,
  // expert) is used within that many tokens after this one.
  int32_t reuse_hidden = 0;
  int32_t reuse_horizons = 0;
};

// A float32 row-major array as torch's state_dict holds it: data and shape.
struct WeightView {
  const float* data = nullptr;
  std::vector<int64_t> shape;
};

class PathDecoder {
 public:
  // `weights` maps PathNet's state_dict names ("embed.weight", "stack.layers.0.norm1.bias",
  // ...) to arrays; they are copied (linear layers' weights transposed for the matrix loops
  // and rounded to bfloat16).
  // Throws std::invalid_argument naming a missing weight or one of the wrong shape.
  PathDecoder(const PathNetShape& shape, const std::map<std::string, WeightView>& weights);

  const PathNetShape& shape() const { return shape_; }

  // Floats of one cached token: keys and values of every layer, [depth, 2, d_model].
  int64_t kv_floats_per_token() const { return int64_t{2} * shape_.depth * shape_.d_model; }

  // One new id of a window: where it sits and where that window's keys/values live.
  struct NewToken {
    int64_t id = 0;
    int32_t position = 0;  // tokens cached before it in its window
    float* kv = nullptr;   // [position + 1 or more, depth, 2, d_model]: rows [0, position) read,
                           // row `position` written
  };

  // Runs new ids through the stack, every layer over all of them at once (each weight is read
  // once per block of tokens, not once per token): rows of a batch, or the ids of a window
  // run whole. Ids of the same window must come in position order; each attends to its
  // window's tokens up to itself (causal, as PathNet.extend).
  // features: [tokens.size(), d_model] out, the final-norm features of each new id.
  // Throws std::invalid_argument on an id outside the vocabulary or a position outside the
  // context.
  void extend(const std::vector<NewToken>& tokens, float* features) const;

  // features [rows, d_model], previous [rows, outputs] (each row's previous token's multi-hot
  // routing; nullptr = none, as zeros) -> probabilities [rows, outputs] (sigmoid of the
  // head's logits) and, given `reuse` [rows, outputs], each output's reuse score: the mean
  // over the reuse head's horizons of the probability of a use within that horizon.
  // Throws std::invalid_argument if `reuse` is asked of a decoder without a reuse head.
  void scores(const float* features, const float* previous, int32_t rows, float* out,
              float* reuse = nullptr) const;

  bool has_reuse() const { return shape_.reuse_horizons > 0; }

 private:
  struct Linear {
    int32_t in = 0, out = 0;
    std::vector<uint16_t> weight_t;                                // [in, out], bfloat16
    std::vector<float> bias;                                       // [out]
    void apply(const float* x, float* y, int32_t rows = 1) const;  // x [rows, in] -> y [rows, out]
  };
  struct Norm {
    std::vector<float> weight, bias;  // [d_model]
  };
  struct Block {
    Norm norm1, norm2;
    Linear qkv, out, up, down;
  };

  void attend(int32_t layer, const NewToken& token, const float* q, float* scratch,
              float* out) const;
  void layer_norm(const Norm& n, const float* x, float* y) const;
  void extend_block(const NewToken* tokens, int32_t count, float* features) const;

  PathNetShape shape_;
  std::vector<float> embed_, position_;  // [vocab, d], [context, d]
  std::vector<Block> blocks_;
  Norm final_norm_;
  Linear previous_, fuse_up_, fuse_down_, head_, reuse_up_, reuse_down_;
};

}  // namespace expertflow::core
