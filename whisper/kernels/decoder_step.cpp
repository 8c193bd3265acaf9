// A decoder layer's whole one-token step as one primitive: self-attention over the key cache,
// cross-attention over the audio (its keys and values, or on AVX-512 its features), the MLP,
// as one pipeline of the kernels the layer's own ops would call.
#include <algorithm>
#include <cmath>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <string>

#include "primitives.h"
#include "simd.h"
#include "threads.h"

namespace menny {

// Rows of a decoding step's matvecs handed out at a time (a multiple of 8).
constexpr std::size_t kStepRowsPerBlock = 64;

// The inputs of a decoder layer's step, in the order of the primitive's inputs: the arrays, then
// the weights in the order of kWeightNames.
enum StepInput : std::size_t {
  kX, kOffset, kKeyCache, kValueCache, kCrossKeys, kCrossValues,
  kAttnLnWeight, kAttnLnBias, kQuery, kQueryBias, kKey, kValue, kValueBias, kOut, kOutBias,
  kCrossLnWeight, kCrossLnBias, kCrossQuery, kCrossQueryBias, kCrossOut, kCrossOutBias,
  kMlpLnWeight, kMlpLnBias, kMlp1, kMlp1Bias, kMlp2, kMlp2Bias, kStepInputs,
  // A step over the audio features (see decoder_layer_step) takes these in their place and more.
  kFramePanels = kCrossKeys, kChannelPanels = kCrossValues,
  kCrossKey = kStepInputs, kCrossValue, kCrossValueBias, kFeatureStepInputs
};

// The weights' names, from kAttnLnWeight on: the block's parameter paths as MLX names them (the
// keys of tree_flatten(block.parameters())).
constexpr const char* kWeightNames[] = {
    "attn_ln.weight", "attn_ln.bias", "attn.query.weight", "attn.query.bias", "attn.key.weight",
    "attn.value.weight", "attn.value.bias", "attn.out.weight", "attn.out.bias", "cross_attn_ln.weight",
    "cross_attn_ln.bias", "cross_attn.query.weight", "cross_attn.query.bias", "cross_attn.out.weight",
    "cross_attn.out.bias", "mlp_ln.weight", "mlp_ln.bias", "mlp1.weight", "mlp1.bias", "mlp2.weight", "mlp2.bias",
    "cross_attn.key.weight", "cross_attn.value.weight", "cross_attn.value.bias"};
static_assert(std::size(kWeightNames) == kFeatureStepInputs - kAttnLnWeight);

#if defined(__x86_64__)
// One token's pass through a decoder layer (self-attention over the key cache, cross-attention
// over the audio, MLP; each behind a layer norm, each added to the residual) as one pipeline:
// the same kernels in the same order as the layer's ops (same bits), without a call per op.
// The token's key and value are written into the caches at the token's position, in place.
//
// Over the features (AVX-512 only): the cross-attention reads the audio features X (n_audio,
// frames, state), packed twice (see decoder_layer), instead of each layer's keys X Wk^T and
// values X Wv^T + bv.  A head's scores are q_h . (X Wk_h^T) = (q_h Wk_h) . X and its output
// Wv_h (p_h X) + bv_h (the probabilities sum to 1): the same values, summed in another order.
// X (3 MB for base) stays in the cache from layer to layer, where the keys and values (6 MB a
// layer) came from DRAM at every step, a third of base's step.
//
// Rows of x come `group` per audio (beams, or samples, of one audio): row r attends over audio
// r / group, and each audio's keys and values, or panels, are read once for all its rows.  The
// offset's second element, if any, counts the positions alike in the caches of an audio's rows
// (its prompt, from the one pass before the rows parted): each row's self-attention reads those
// from the audio's first row, all its rows at once, and only its own positions after them.  Its
// elements after those, if any, are each row's source (beam search): first, row r's cache
// positions from the alike ones to the token's become row sources[r]'s, as `reorder_rows` does,
// without a call of its own.
void decoder_layer_step(const std::vector<mx::array>& in, float* result, float* key_cache, float* value_cache,
                        std::size_t n_head, float scale, float eps, bool over_features, std::size_t group) {
  const std::size_t batch = in[kX].shape(0), state = in[kX].shape(2), head_dim = state / n_head;
  const std::size_t ctx = in[kKeyCache].shape(1), hidden = in[kMlp1].shape(0);
  const std::size_t audio = over_features ? in[kChannelPanels].shape(2) : in[kCrossKeys].shape(1);
  const std::size_t position =
      std::clamp<std::ptrdiff_t>(in[kOffset].data<int32_t>()[0], 0, static_cast<std::ptrdiff_t>(ctx) - 1);
  const std::size_t alike = group > 1 && in[kOffset].size() > 1
                                ? std::clamp<std::ptrdiff_t>(in[kOffset].data<int32_t>()[1], 0, position)
                                : 0;
  if (in[kOffset].size() > 2) {
    const std::size_t row_bytes = ctx * state * sizeof(float), first = alike * state * sizeof(float);
    for (float* cache : {key_cache, value_cache}) {
      reorder_rows_in_place(reinterpret_cast<char*>(cache), in[kOffset].data<int32_t>() + 2, batch, row_bytes, first,
                            (position - alike) * state * sizeof(float));
    }
  }
  auto vector = [&](StepInput i) { return in[i].data<float>(); };
  auto matrix = [&](StepInput i) { return Matrix(in[i]); };
  // Per batch row: a layer norm's output, the query, the attention's output, the residual
  // after self-attention and after cross-attention, and the MLP's hidden layer.
  std::vector<float> buffers(batch * (5 * state + hidden));
  float* normed = buffers.data();
  float* query = normed + batch * state;
  float* attended = query + batch * state;
  float* after_self = attended + batch * state;
  float* after_cross = after_self + batch * state;
  float* mlp = after_cross + batch * state;
  std::vector<float> feature_scratch;  // attend_features's

  auto pipeline = std::make_shared<Pipeline>();
  auto layer_norm = [&](const float* src, StepInput weight) {
    pipeline->add(1, 1, [=, w = vector(weight), b = vector(static_cast<StepInput>(weight + 1))](std::size_t,
                                                                                                std::size_t) {
      layer_norm_rows(src, w, b, normed, batch, state, eps);
    });
  };
  // dst (rows ld apart) = src @ w.T + bias for rows [0, rows) of w, handed out in blocks; then
  // `finish(dst row, begin, end)` on each block of each row.
  auto project = [&](const float* src, StepInput weight, const float* bias, float* dst, std::size_t ld,
                     std::function<void(float*, std::size_t, std::size_t)> finish) {
    const std::size_t depth = in[weight].shape(1);
    pipeline->add(in[weight].shape(0), kStepRowsPerBlock, [=, w = matrix(weight)](std::size_t begin, std::size_t end) {
      w.times(src, batch, bias, depth, dst, ld, begin, end);
      if (finish) {
        for (std::size_t b = 0; b < batch; ++b) {
          finish(dst + b * ld, begin, end);
        }
      }
    });
  };
  // dst = residual + dst, row by row (the rows `state` apart in both).
  auto add_to = [=](const float* residual, float* dst) {
    return [=](float* row, std::size_t begin, std::size_t end) {
      const float* from = residual + (row - dst);
      for (std::size_t i = begin; i < end; ++i) {
        row[i] = from[i] + row[i];
      }
    };
  };
  // The queries' attention over the first n_keys of `rows` rows of keys and values (batch /
  // per_source, rows, state), per_source query rows at a time over one source's: the same sums
  // for each as alone.  visible: as in attention_block_avx2 (for one query row a source).
  auto attend = [&](const float* keys, const float* values, std::size_t rows, std::size_t n_keys, std::size_t visible,
                    std::size_t per_source) {
    pipeline->add(batch / per_source * n_head, 1, [=](std::size_t begin, std::size_t end) {
      thread_local std::vector<float> scratch;
      const std::size_t padded = (n_keys + 15) / 16 * 16;
      scratch.resize(per_source * (padded + 1));
      for (std::size_t task = begin; task < end; ++task) {
        const std::size_t source = task / n_head, column = (task % n_head) * head_dim;
        const std::size_t kv = source * rows * state + column, first = source * per_source * state + column;
        attention_block_avx2(query + first, nullptr, keys + kv, nullptr, values + kv, attended + first,
                             scratch.data(), scratch.data() + per_source * padded, per_source, n_keys, padded,
                             head_dim, state, scale, visible);
      }
    });
  };

  // Each query's attention over its cache's first n_keys positions, the first `alike` of them
  // read from its audio's first row for all the audio's rows: the same scores (each key's dot
  // product is alone) and the same weighted sums (one chain over the positions in order).
  auto attend_alike = [&](std::size_t n_keys) {
    pipeline->add(batch / group * n_head, 1, [=](std::size_t begin, std::size_t end) {
      thread_local std::vector<float> scratch;
      const std::size_t padded = (n_keys + 15) / 16 * 16;
      scratch.resize(group * padded);
      const std::size_t row_floats = ctx * state;
      for (std::size_t task = begin; task < end; ++task) {
        const std::size_t first_row = task / n_head * group, column = (task % n_head) * head_dim;
        const float* shared_keys = key_cache + first_row * row_floats + column;
        scores_direct_avx2(query + first_row * state + column, shared_keys, scratch.data(), group, alike, padded,
                           head_dim, state);
        for (std::size_t i = 0; i < group; ++i) {
          const std::size_t row = first_row + i;
          float* scores = scratch.data() + i * padded;
          scores_direct_avx2(query + row * state + column, key_cache + row * row_floats + alike * state + column,
                             scores + alike, 1, n_keys - alike, padded, head_dim, state);
          const float inverse_sum = 1.0f / exp_row_avx2(scores, scores, n_keys, scale);
          row_times_matrix_avx2(scores, value_cache + first_row * row_floats + column,
                                value_cache + row * row_floats + column, alike, state, attended + row * state + column,
                                head_dim, n_keys, inverse_sum);
        }
      }
    });
  };

  // The queries' attention over the features (see above), into `attended`: the (row, head)s of
  // one audio, group * n_head of them, multiplied by each of its panels in one pass.
  auto attend_features = [&]() {
    const std::size_t n_panels = in[kFramePanels].shape(1), ld_scores = n_panels * kPanelWidth;
    const std::size_t heads = batch * n_head, n_audio = batch / group, per_audio = group * n_head;
    // Per batch row and head: the folded query, the scores (then their exponentials) and the
    // weighted sum of the features; per head the inverse of its exponentials' sum.
    feature_scratch.resize(heads * (2 * state + ld_scores + 1));
    float* folded = feature_scratch.data();
    float* scores = folded + heads * state;
    float* mixed = scores + heads * ld_scores;
    float* inverse_sums = mixed + heads * state;
    const float* frame_panels = vector(kFramePanels);
    const float* channel_panels = vector(kChannelPanels);
    pipeline->add(heads, 1, [=, w = matrix(kCrossKey)](std::size_t begin, std::size_t end) {
      for (std::size_t task = begin; task < end; ++task) {
        const std::size_t b = task / n_head, first = (task % n_head) * head_dim;
        const float* q = query + b * state + first;
        w.with_weights([&](auto* weights) { fold_rows(q, weights + first * state, head_dim, state, folded + task * state); });
      }
    });
    pipeline->add(n_audio * n_panels, 1, [=](std::size_t begin, std::size_t end) {
      for (std::size_t task = begin; task < end; ++task) {
        const std::size_t a = task / n_panels, p = task % n_panels;
        panel_rows(folded + a * per_audio * state, state, frame_panels + task * state * kPanelWidth, state, nullptr,
                   false, nullptr, scores + a * per_audio * ld_scores + p * kPanelWidth, ld_scores, per_audio);
      }
    });
    pipeline->add(heads, 1, [=](std::size_t begin, std::size_t end) {
      for (std::size_t task = begin; task < end; ++task) {
        float* row = scores + task * ld_scores;
        inverse_sums[task] = 1.0f / exp_row_avx2(row, row, audio, scale);
      }
    });
    const std::size_t column_panels = state / kPanelWidth;
    pipeline->add(n_audio * column_panels, 1, [=](std::size_t begin, std::size_t end) {
      for (std::size_t task = begin; task < end; ++task) {
        const std::size_t a = task / column_panels, column = task % column_panels * kPanelWidth;
        float* out = mixed + a * per_audio * state + column;
        panel_rows(scores + a * per_audio * ld_scores, ld_scores, channel_panels + task * audio * kPanelWidth, audio,
                   nullptr, false, nullptr, out, state, per_audio);
        for (std::size_t i = 0; i < per_audio; ++i) {
          for (std::size_t j = 0; j < kPanelWidth; ++j) {
            out[i * state + j] *= inverse_sums[a * per_audio + i];
          }
        }
      }
    });
    // Each head's rows of the value projection times that head's weighted sum.
    pipeline->add(state, kStepRowsPerBlock,
                  [=, w = matrix(kCrossValue), bias = vector(kCrossValueBias)](std::size_t begin, std::size_t end) {
                    for (std::size_t row = begin; row < end;) {
                      const std::size_t h = row / head_dim, last = std::min(end, (h + 1) * head_dim);
                      for (std::size_t b = 0; b < batch; ++b) {
                        w.times(mixed + (b * n_head + h) * state, 1, bias, state, attended + b * state, 0, row, last);
                      }
                      row = last;
                    }
                  });
  };

  const float* x = vector(kX);
  layer_norm(x, kAttnLnWeight);
  // q, k and v in one stage: rows of the three matrices, k and v straight into the caches.
  const std::size_t cache_row = position * state, cache_ld = ctx * state;
  pipeline->add(3 * state, kStepRowsPerBlock,
                [=, q = matrix(kQuery), k = matrix(kKey), v = matrix(kValue), q_bias = vector(kQueryBias),
                 v_bias = vector(kValueBias)](std::size_t begin, std::size_t end) {
                  for (std::size_t row = begin; row < end;) {
                    const std::size_t which = row / state, first = row - which * state;
                    const std::size_t last = std::min(end, (which + 1) * state) - which * state;
                    if (which == 0) {
                      q.times(normed, batch, q_bias, state, query, state, first, last);
                    } else if (which == 1) {
                      k.times(normed, batch, nullptr, state, key_cache + cache_row, cache_ld, first, last);
                    } else {
                      v.times(normed, batch, v_bias, state, value_cache + cache_row, cache_ld, first, last);
                    }
                    row += last - first;
                  }
                });
  if (alike > 0) {
    attend_alike(position + 1);
  } else {
    attend(key_cache, value_cache, ctx, position + 1, position + 1, 1);
  }
  project(attended, kOut, vector(kOutBias), after_self, state, add_to(x, after_self));
  layer_norm(after_self, kCrossLnWeight);
  project(normed, kCrossQuery, vector(kCrossQueryBias), query, state, nullptr);
  if (over_features) {
    attend_features();
  } else {
    attend(vector(kCrossKeys), vector(kCrossValues), audio, audio, 0, group);
  }
  project(attended, kCrossOut, vector(kCrossOutBias), after_cross, state, add_to(after_self, after_cross));
  layer_norm(after_cross, kMlpLnWeight);
  project(normed, kMlp1, vector(kMlp1Bias), mlp, hidden, [](float* row, std::size_t begin, std::size_t end) {
    gelu_avx2(row + begin, row + begin, end - begin);
  });
  project(mlp, kMlp2, vector(kMlp2Bias), result, state, add_to(after_cross, result));
  Pipeline::run(pipeline);
}
#endif

// A decoder layer's one-token step (decoder_layer_step).  Outputs: the layer's output, then the
// key and value caches, which are the input caches' memory with the token's key and value
// written at its position.  In place, not copied (MLX would copy a cache the caller still
// holds, 2 x 0.7-0.9 MB per layer and step): the decoding loop keeps only the newest cache and
// never reads the old one's positions from the token's on.
class MennyDecoderStep : public mx::Primitive {
 public:
  MennyDecoderStep(mx::Stream stream, int n_head, float scale, float eps, bool over_features, int group)
      : mx::Primitive(stream),
        n_head_(n_head),
        scale_(scale),
        eps_(eps),
        over_features_(over_features),
        group_(group) {}

  const char* name() const override {
    return "MennyDecoderStep";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto* same = dynamic_cast<const MennyDecoderStep*>(&other);
    return same && same->n_head_ == n_head_ && same->scale_ == scale_ && same->eps_ == eps_ &&
           same->over_features_ == over_features_ && same->group_ == group_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[kX].shape(), inputs[kKeyCache].shape(), inputs[kValueCache].shape()};
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("MennyDecoderStep runs on the CPU only; use MLX's own ops on a GPU");
  }

  // The inputs come as they are, without a contiguous() node each (27 a layer: building and
  // evaluating those cost a step a third of a millisecond); one not in row order is copied here.
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    outputs[0].set_data(mx::allocator::malloc(outputs[0].nbytes()));
    for (std::size_t i : {std::size_t{1}, std::size_t{2}}) {
      const mx::array& cache = inputs[i == 1 ? kKeyCache : kValueCache];
      if (in_row_order(cache)) {
        outputs[i].copy_shared_buffer(cache);
      } else {
        outputs[i].set_data(mx::allocator::malloc(outputs[i].nbytes()));
      }
    }
    auto& encoder = encoder_for(stream(), inputs, outputs);
#if defined(__x86_64__)
    encoder.dispatch([inputs, outputs, n_head = n_head_, scale = scale_, eps = eps_,
                      over_features = over_features_, group = group_]() mutable {
      std::vector<mx::array> ordered;
      for (const mx::array& input : inputs) {
        ordered.push_back(in_row_order(input) ? input : copy_in_row_order(input));
      }
      for (std::size_t i : {std::size_t{1}, std::size_t{2}}) {
        const mx::array& cache = inputs[i == 1 ? kKeyCache : kValueCache];
        if (!in_row_order(cache)) {
          copy_in_row_order(cache, outputs[i].data<char>());
        }
      }
      decoder_layer_step(ordered, outputs[0].data<float>(), outputs[1].data<float>(), outputs[2].data<float>(),
                         n_head, scale, eps, over_features, group);
    });
#endif
  }

 private:
  int n_head_;
  float scale_;
  float eps_;
  bool over_features_;
  int group_;
};

std::vector<mx::array> decoder_layer(const mx::array& x, const mx::array& offset, const mx::array& key_cache,
                                     const mx::array& value_cache, const mx::array& audio, const mx::array& audio_second,
                                     const std::map<std::string, mx::array>& weights, int n_head, float eps,
                                     bool over_features, int group) {
  auto expect = [](bool ok, const std::string& what) {
    if (!ok) {
      throw std::invalid_argument(what);
    }
  };
  expect(x.ndim() == 3 && x.shape(1) == 1 && x.dtype() == mx::float32, "expected x (rows, 1, state), float32");
  expect(group > 0 && x.shape(0) % group == 0, "the rows of x must be whole groups (rows = n_audio * group)");
  const int rows = x.shape(0), n_audio = rows / group, state = x.shape(2);
  expect(n_head > 0 && state % n_head == 0 && (state / n_head) % 16 == 0,
         "the state must split into heads of a multiple of 16");
  expect((offset.size() == 1 || offset.size() == 2 || offset.size() == 2 + x.shape(0)) && offset.dtype() == mx::int32,
         "the offset is int32: the position, then maybe the positions alike in an audio's rows, then maybe each "
         "row's source");
  auto rows_of_state = [&](const mx::array& a, int n) {
    return a.ndim() == 3 && a.shape(0) == n && a.shape(2) == state && a.shape(1) > 0 && a.dtype() == mx::float32;
  };
  expect(rows_of_state(key_cache, rows) && key_cache.shape() == value_cache.shape(),
         "expected the caches (rows, n_ctx, state), float32");
  if (over_features) {
    expect(uses_avx512(), "a step over the audio features needs AVX-512");
    const int width = kPanelWidth, frames = audio_second.ndim() == 4 ? audio_second.shape(2) : 0;
    expect(state % width == 0 && frames > 0 && audio.dtype() == mx::float32 && audio_second.dtype() == mx::float32 &&
               audio.shape() == mx::Shape({n_audio, (frames + width - 1) / width, state, width}) &&
               audio_second.shape() == mx::Shape({n_audio, state / width, frames, width}),
           "expected the features of rows / group audios (n_audio, frames, state) as frame panels (n_audio, "
           "frames / 32 rounded up, state, 32) and channel panels (n_audio, state / 32, frames, 32), float32");
  } else {
    expect(rows_of_state(audio, n_audio) && audio.shape() == audio_second.shape(),
           "expected the keys and values of rows / group audios (n_audio, frames, state), float32");
  }
  const std::size_t end = over_features ? kFeatureStepInputs : kStepInputs;
  std::string missing;
  for (std::size_t i = kAttnLnWeight; i < end; ++i) {
    if (!weights.contains(kWeightNames[i - kAttnLnWeight])) {
      missing += std::string(missing.empty() ? "" : ", ") + kWeightNames[i - kAttnLnWeight];
    }
  }
  if (!missing.empty()) {
    throw std::invalid_argument("the step's weights lack " + missing + " (pass the block's parameters by name: "
                                "dict(tree_flatten(block.parameters())))");
  }
  const mx::Stream stream = cpu_stream();
  std::vector<mx::array> inputs{x, offset, key_cache, value_cache, audio, audio_second};
  const int hidden = weights.at("mlp1.weight").ndim() == 2 ? weights.at("mlp1.weight").shape(0) : 0;
  const std::size_t matrices[] = {kQuery, kKey, kValue, kOut, kCrossQuery, kCrossOut, kMlp1, kMlp2, kCrossKey,
                                  kCrossValue};
  for (std::size_t i = kAttnLnWeight; i < end; ++i) {
    const std::string name = kWeightNames[i - kAttnLnWeight];
    const mx::array& w = weights.at(name);
    if (std::find(std::begin(matrices), std::end(matrices), i) != std::end(matrices)) {
      const int rows = i == kMlp1 ? hidden : state, depth = i == kMlp2 ? hidden : state;
      expect(w.ndim() == 2 && w.shape(0) == rows && w.shape(1) == depth &&
                 (w.dtype() == mx::float16 || w.dtype() == mx::float32),
             name + ": expected a matrix (" + std::to_string(rows) + ", " + std::to_string(depth) +
                 "), float16 or float32");
    } else {
      const int n = i == kMlp1Bias ? hidden : state;
      expect(w.ndim() == 1 && w.shape(0) == n && w.dtype() == mx::float32,
             name + ": expected a vector (" + std::to_string(n) + ",), float32");
    }
    inputs.push_back(w);
  }
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(state / n_head)));
  return mx::array::make_arrays({x.shape(), key_cache.shape(), value_cache.shape()},
                                {mx::float32, mx::float32, mx::float32},
                                std::make_shared<MennyDecoderStep>(stream, n_head, scale, eps, over_features, group),
                                inputs);
}

}  // namespace menny
