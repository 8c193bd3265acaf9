// The choice of tokens where the logits are: each row's likeliest allowed token and its
// log-probability (greedy decoding), or its k likeliest (a beam's candidates), in a few passes
// over the vocabulary.
#include <algorithm>
#include <cmath>

#include "primitives.h"
#include "threads.h"

namespace menny {

#if defined(__x86_64__)
// row[v] = logits[v], or -inf where forbidden[v] or v lies in one of the [start, stop) ranges.
void allowed_row(const float* logits, const bool* forbidden, const int32_t* ranges, std::size_t n_ranges,
                 std::size_t vocab, float* row) {
  for (std::size_t v = 0; v < vocab; ++v) {
    row[v] = forbidden[v] ? -INFINITY : logits[v];
  }
  for (std::size_t r = 0; r < n_ranges; ++r) {
    const auto stop = std::min(static_cast<std::size_t>(std::max(ranges[2 * r + 1], 0)), vocab);
    const auto start = std::min(static_cast<std::size_t>(std::max(ranges[2 * r], 0)), stop);
    std::fill(row + start, row + stop, -INFINITY);
  }
}

// A greedy decoder's choice over one row of logits (decoding._greedy_choice): logits[v] counts as
// -inf where forbidden[v] or v lies in one of the [start, stop) ranges; with timestamp_begin <
// vocab, when all timestamps together are likelier than the likeliest text token (logsumexp of
// the timestamps' logits above the best text logit), text tokens are forbidden too.  The
// likeliest allowed token (the first of equals) and its log-probability among the allowed ones.
// `scratch` holds 2 * vocab floats.
MENNY_AVX2 std::pair<int32_t, float> greedy_choice_row(const float* logits, const bool* forbidden, const int32_t* ranges,
                                                       std::size_t n_ranges, std::size_t vocab,
                                                       std::size_t timestamp_begin, float* scratch) {
  float* row = scratch;
  float* exponentials = scratch + vocab;
  allowed_row(logits, forbidden, ranges, n_ranges, vocab, row);
  auto first_max = [&](std::size_t begin, std::size_t end) {
    std::size_t best = begin;
    for (std::size_t v = begin; v < end; ++v) {
      best = row[v] > row[best] ? v : best;
    }
    return best;
  };
  // exp_row_avx2 subtracts the maximum itself: the log of the sum of exp(logit - maximum).
  auto log_sum = [&](std::size_t begin, std::size_t end) {
    return std::log(exp_row_avx2(row + begin, exponentials, end - begin, 1.0f));
  };
  const std::size_t text = first_max(0, std::min(timestamp_begin, vocab));
  const float text_max = timestamp_begin > 0 ? row[text] : -INFINITY;
  if (timestamp_begin < vocab) {
    const std::size_t stamp = first_max(timestamp_begin, vocab);
    const float stamp_max = row[stamp];
    if (stamp_max > -INFINITY) {
      const float stamps = log_sum(timestamp_begin, vocab);
      // (stamps >= 0: a timestamp likelier than any text token always wins.)
      if (stamp_max + stamps > text_max) {
        return {static_cast<int32_t>(stamp), -stamps};
      }
    }
  }
  if (text_max == -INFINITY) {  // nothing allowed: as argmax and log_softmax over -inf give
    return {0, NAN};
  }
  return {static_cast<int32_t>(text), -log_sum(0, vocab)};
}

// A beam's candidates over one row of logits (rules.top_choices): the rules as in
// greedy_choice_row (text forbidden when the timestamps together are likelier), then the k
// likeliest allowed tokens, largest first and the first of equals first (a stable sort's order),
// into ids and their log-probabilities among the allowed tokens into logprobs (-inf where fewer
// than k are allowed).  `scratch` holds 2 * vocab floats.
MENNY_AVX2 void top_choices_row(const float* logits, const bool* forbidden, const int32_t* ranges,
                                std::size_t n_ranges, std::size_t vocab, std::size_t timestamp_begin, std::size_t k,
                                float* scratch, int32_t* ids, float* logprobs) {
  float* row = scratch;
  float* exponentials = scratch + vocab;
  allowed_row(logits, forbidden, ranges, n_ranges, vocab, row);
  if (timestamp_begin < vocab) {
    const float text_max = *std::max_element(row, row + timestamp_begin);
    const float stamp_max = *std::max_element(row + timestamp_begin, row + vocab);
    if (stamp_max > -INFINITY) {
      const float stamps = std::log(exp_row_avx2(row + timestamp_begin, exponentials, vocab - timestamp_begin, 1.0f));
      if (stamp_max + stamps > text_max) {
        std::fill(row, row + timestamp_begin, -INFINITY);
      }
    }
  }
  // The k largest so far in logprobs (then made log-probabilities), by insertion.
  std::size_t kept = 0;
  for (std::size_t v = 0; v < vocab; ++v) {
    const float x = row[v];
    if (kept == k && !(x > logprobs[k - 1])) {
      continue;
    }
    std::size_t at = kept < k ? kept++ : k - 1;
    for (; at > 0 && x > logprobs[at - 1]; --at) {
      logprobs[at] = logprobs[at - 1];
      ids[at] = ids[at - 1];
    }
    logprobs[at] = x;
    ids[at] = static_cast<int32_t>(v);
  }
  const float top = logprobs[0];
  if (top == -INFINITY) {  // nothing allowed
    return;
  }
  // exp_row_avx2 subtracts the maximum itself: the log of the sum of exp(logit - maximum).
  const float norm = top + std::log(exp_row_avx2(row, exponentials, vocab, 1.0f));
  for (std::size_t i = 0; i < k; ++i) {
    logprobs[i] -= norm;
  }
}
#endif

// Each row's greedy choice (greedy_choice_row), or with k > 0 its k likeliest tokens
// (top_choices_row).  Outputs: the ids (batch,) or (batch, k) int32 and their log-probabilities,
// float32, of the same shape.
class MennyTokenChoice : public mx::Primitive {
 public:
  MennyTokenChoice(mx::Stream stream, int timestamp_begin, int k)
      : mx::Primitive(stream), timestamp_begin_(timestamp_begin), k_(k) {}

  const char* name() const override {
    return "MennyTokenChoice";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto* same = dynamic_cast<const MennyTokenChoice*>(&other);
    return same && same->timestamp_begin_ == timestamp_begin_ && same->k_ == k_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const mx::Shape shape = k_ > 0 ? mx::Shape{inputs[0].shape(0), k_} : mx::Shape{inputs[0].shape(0)};
    return {shape, shape};
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("MennyTokenChoice runs on the CPU only");
  }

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    for (mx::array& out : outputs) {
      out.set_data(mx::allocator::malloc(out.nbytes()));
    }
    auto& encoder = encoder_for(stream(), inputs, outputs);
#if defined(__x86_64__)
    encoder.dispatch([logits = inputs[0], forbidden = inputs[1], ranges = inputs[2], chosen = outputs[0],
                      logprobs = outputs[1], timestamp_begin = timestamp_begin_, k = k_]() mutable {
      const std::size_t batch = logits.shape(0), vocab = logits.shape(1), n_ranges = ranges.shape(1);
      // Rows (beams, a batch's windows) on every core: each row's passes read its logits alone.
      parallel_for(batch, vocab, 1, [&](std::size_t begin, std::size_t end) {
        thread_local std::vector<float> scratch;
        scratch.resize(2 * vocab);
        for (std::size_t b = begin; b < end; ++b) {
          const bool* mask = forbidden.data<bool>() + (forbidden.shape(0) == 1 ? 0 : b * vocab);
          const float* row = logits.data<float>() + b * vocab;
          const int32_t* row_ranges = ranges.data<int32_t>() + b * n_ranges * 2;
          const auto first_timestamp = static_cast<std::size_t>(timestamp_begin);
          if (k > 0) {
            top_choices_row(row, mask, row_ranges, n_ranges, vocab, first_timestamp, k, scratch.data(),
                            chosen.data<int32_t>() + b * k, logprobs.data<float>() + b * k);
            continue;
          }
          const auto [token, logprob] =
              greedy_choice_row(row, mask, row_ranges, n_ranges, vocab, first_timestamp, scratch.data());
          chosen.data<int32_t>()[b] = token;
          logprobs.data<float>()[b] = logprob;
        }
      }, vocab);
    });
#endif
  }

 private:
  int timestamp_begin_;
  int k_;
};

std::vector<mx::array> token_choice(const mx::array& logits, const mx::array& forbidden, const mx::array& ranges,
                                    int timestamp_begin, int k) {
  if (logits.ndim() != 2 || !mx::issubdtype(logits.dtype(), mx::floating) || forbidden.ndim() != 2 ||
      forbidden.dtype() != mx::bool_ || forbidden.shape(1) != logits.shape(1) ||
      (forbidden.shape(0) != 1 && forbidden.shape(0) != logits.shape(0)) || ranges.ndim() != 3 ||
      ranges.shape(0) != logits.shape(0) || ranges.shape(2) != 2 || !mx::issubdtype(ranges.dtype(), mx::integer) ||
      timestamp_begin < 0 || k < 0 || k > logits.shape(1)) {
    throw std::invalid_argument(
        "expected logits (batch, vocab), a forbidden mask (1 or batch, vocab), ranges (batch, n, 2) of integers, "
        "timestamp_begin >= 0 and 0 <= k <= vocab");
  }
  const mx::Stream stream = cpu_stream();
  std::vector<mx::array> inputs{float32_rows(logits, stream), mx::contiguous(forbidden, false, stream),
                                mx::contiguous(mx::astype(ranges, mx::int32, stream), false, stream)};
  const mx::Shape shape = k > 0 ? mx::Shape{logits.shape(0), k} : mx::Shape{logits.shape(0)};
  return mx::array::make_arrays({shape, shape}, {mx::int32, mx::float32},
                                std::make_shared<MennyTokenChoice>(stream, timestamp_begin, k), inputs);
}

}  // namespace menny
