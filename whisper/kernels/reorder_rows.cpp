// Reordering a self-attention cache's rows in place (beam search: each beam continues another's
// sequence), copying only the rows that change and only the positions written so far.
#include <algorithm>
#include <cstring>
#include <vector>

#include "primitives.h"

namespace menny {

// Rows of `rows` rows of row_bytes bytes each: row i's bytes [0, span_bytes) from `first` on
// become row sources[i]'s.
// Rows whose source is themselves (or outside [0, rows)) are left alone.  A source that is also
// overwritten is read from a copy taken first, so that cycles (two beams swapping) come out right.
void reorder_rows_in_place(char* cache, const std::int32_t* sources, std::size_t rows, std::size_t row_bytes,
             std::size_t first, std::size_t span_bytes) {
  auto moves = [&](std::size_t i) { return sources[i] >= 0 && static_cast<std::size_t>(sources[i]) < rows &&
                                           static_cast<std::size_t>(sources[i]) != i; };
  std::vector<bool> overwritten(rows, false);
  for (std::size_t i = 0; i < rows; ++i) {
    overwritten[i] = moves(i);
  }
  // The spans of the sources that are overwritten, each copied once.
  std::vector<std::size_t> slot(rows, rows);
  std::vector<char> saved;
  for (std::size_t i = 0; i < rows; ++i) {
    const auto source = static_cast<std::size_t>(sources[i]);
    if (moves(i) && overwritten[source] && slot[source] == rows) {
      slot[source] = saved.size() / std::max<std::size_t>(span_bytes, 1);
      const char* span = cache + source * row_bytes + first;
      saved.insert(saved.end(), span, span + span_bytes);
    }
  }
  for (std::size_t i = 0; i < rows; ++i) {
    if (moves(i)) {
      const auto source = static_cast<std::size_t>(sources[i]);
      const char* from =
          overwritten[source] ? saved.data() + slot[source] * span_bytes : cache + source * row_bytes + first;
      std::memcpy(cache + i * row_bytes + first, from, span_bytes);
    }
  }
}

namespace {

// The reordered cache, which is the input cache's memory (as a decoder step's caches are): in
// place, not copied, since the caller keeps only the newest cache.
class MennyReorderRows : public mx::UnaryPrimitive {
 public:
  using mx::UnaryPrimitive::UnaryPrimitive;

  const char* name() const override {
    return "MennyReorderRows";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return std::string(name()) == other.name();
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("MennyReorderRows runs on the CPU only; use MLX's own ops on a GPU");
  }

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& cache = inputs[0];
    if (in_row_order(cache)) {
      out.copy_shared_buffer(cache);
    } else {
      out.set_data(mx::allocator::malloc(out.nbytes()));
    }
    auto& encoder = encoder_for(stream(), inputs, {out});
    encoder.dispatch([cache, sources = inputs[1], span = inputs[2], out]() mutable {
      if (!in_row_order(cache)) {
        copy_in_row_order(cache, out.data<char>());
      }
      const std::size_t rows = cache.shape(0), ctx = cache.shape(1), position_bytes = cache.shape(2) * cache.itemsize();
      auto position = [&](int i) {
        return static_cast<std::size_t>(std::clamp<std::int64_t>(span.data<std::int32_t>()[i], 0, ctx));
      };
      const std::size_t start = position(0), stop = std::max(start, position(1));
      reorder_rows_in_place(out.data<char>(), sources.data<std::int32_t>(), rows, ctx * position_bytes, start * position_bytes,
              (stop - start) * position_bytes);
    });
  }
};

}  // namespace

mx::array reorder_rows(const mx::array& cache, const mx::array& sources, const mx::array& positions) {
  if (cache.ndim() != 3 || sources.ndim() != 1 || sources.shape(0) != cache.shape(0) ||
      !mx::issubdtype(sources.dtype(), mx::integer) || positions.size() != 2 ||
      !mx::issubdtype(positions.dtype(), mx::integer)) {
    throw std::invalid_argument("expected a cache (rows, n_ctx, state), sources (rows,) and positions [start, "
                                "stop) (two elements), integers");
  }
  // Sources already computed are checked here, not silently later; evaluating them would wait
  // for the stream's queued work (the step before), which the caller sends ahead.
  if (sources.is_available() && sources.flags().row_contiguous &&
      (sources.dtype() == mx::int32 || sources.dtype() == mx::int64)) {
    auto outside = [&](auto* index) {
      return std::any_of(index, index + sources.size(), [&](std::int64_t s) { return s < 0 || s >= cache.shape(0); });
    };
    if (sources.dtype() == mx::int32 ? outside(sources.data<std::int32_t>()) : outside(sources.data<std::int64_t>())) {
      throw std::invalid_argument("each source is a row of the cache, 0 to rows - 1");
    }
  }
  const mx::Stream stream = cpu_stream();
  std::vector<mx::array> inputs{cache, mx::contiguous(mx::astype(sources, mx::int32, stream), false, stream),
                                mx::astype(mx::reshape(positions, {2}, stream), mx::int32, stream)};
  return mx::array(cache.shape(), cache.dtype(), std::make_shared<MennyReorderRows>(stream), std::move(inputs));
}

}  // namespace menny
