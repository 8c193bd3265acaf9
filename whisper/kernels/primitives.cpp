// MLX primitives for the element-wise and product kernels (softmax, GELU, layer norm, attention,
// matvec, the panel product) and the functions that build their arrays.
#include "primitives.h"

#include <algorithm>
#include <memory>

#include "threads.h"

namespace menny {

mx::cpu::CommandEncoder& encoder_for(mx::Stream stream, const std::vector<mx::array>& inputs,
                                     std::vector<mx::array> outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& input : inputs) {
    encoder.set_input_array(input);
  }
  for (auto& output : outputs) {
    encoder.set_output_array(output);
  }
  return encoder;
}

class MennySoftmax : public CpuKernel {
 public:
  using CpuKernel::CpuKernel;

  const char* name() const override {
    return "MennySoftmax";
  }

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& in = inputs[0];
    auto& encoder = output_like_input(inputs, out);
    const std::size_t n = in.shape(-1);
    const std::size_t rows = n == 0 ? 0 : in.size() / n;
#if defined(__x86_64__)
    encoder.dispatch([in, out, rows, n]() mutable {
      const float* src = in.data<float>();
      float* dst = out.data<float>();
      parallel_for(rows, n, 1, [=](std::size_t begin, std::size_t end) {
        softmax_rows_avx2(src + begin * n, dst + begin * n, end - begin, n);
      });
    });
#endif
  }
};

class MennyGelu : public CpuKernel {
 public:
  using CpuKernel::CpuKernel;

  const char* name() const override {
    return "MennyGelu";
  }

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& in = inputs[0];
    auto& encoder = output_like_input(inputs, out);
#if defined(__x86_64__)
    encoder.dispatch([in, out]() mutable {
      const float* src = in.data<float>();
      float* dst = out.data<float>();
      // Ranges of whole cache lines, so threads never write the same line.
      parallel_for(in.size(), 1, 16, [=](std::size_t begin, std::size_t end) {
        gelu_avx2(src + begin, dst + begin, end - begin);
      });
    });
#endif
  }
};

// mx.fast.layer_norm over the last axis (layer_norm_rows), rows split across the cores: MLX's
// own runs its ops one after the other on one thread.
class MennyLayerNorm : public CpuKernel {
 public:
  MennyLayerNorm(mx::Stream stream, float eps) : CpuKernel(stream), eps_(eps) {}

  const char* name() const override {
    return "MennyLayerNorm";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto* same = dynamic_cast<const MennyLayerNorm*>(&other);
    return same && same->eps_ == eps_;
  }

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = output_like_input(inputs, out);
    encoder.dispatch([x = inputs[0], weight = inputs[1], bias = inputs[2], out, eps = eps_]() mutable {
      const std::size_t n = x.shape(-1), rows = x.size() / n;
      const float* src = x.data<float>();
      const float *w = weight.data<float>(), *b = bias.data<float>();
      float* dst = out.data<float>();
      parallel_for(rows, n, 8, [=](std::size_t begin, std::size_t end) {
        layer_norm_rows(src + begin * n, w, b, dst + begin * n, end - begin, n, eps);
      });
    });
  }

 private:
  float eps_;
};

class MennyAttention : public CpuKernel {
 public:
  MennyAttention(mx::Stream stream, int n_head, float scale) : CpuKernel(stream), n_head_(n_head), scale_(scale) {}

  const char* name() const override {
    return "MennyAttention";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto* same = dynamic_cast<const MennyAttention*>(&other);
    return same && same->n_head_ == n_head_ && same->scale_ == scale_;
  }

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = fresh_output(inputs, out);
#if defined(__x86_64__)
    // A fourth input, the position of the first query, makes it causal over a key cache.
    const std::optional<mx::array> offset = inputs.size() > 3 ? std::optional(inputs[3]) : std::nullopt;
    encoder.dispatch([q = inputs[0], k = inputs[1], v = inputs[2], offset, out, n_head = n_head_,
                      scale = scale_]() mutable {
      const std::size_t n_q = q.shape(1), kv_rows = k.shape(1);
      std::ptrdiff_t causal_offset = -1;
      std::size_t n_k = kv_rows;
      if (offset) {
        causal_offset = std::clamp<std::ptrdiff_t>(offset->data<int32_t>()[0], 0, kv_rows - n_q);
        n_k = causal_offset + n_q;
      }
      attention(q.data<float>(), k.data<float>(), v.data<float>(), out.data<float>(), q.shape(0), n_q, n_k, kv_rows,
                q.shape(2), n_head, scale, causal_offset);
    });
#endif
  }

 private:
  int n_head_;
  float scale_;
};

bool in_row_order(const mx::array& a) {
  std::int64_t stride = 1;
  for (int axis = a.ndim() - 1; axis >= 0; --axis) {
    if (a.shape(axis) != 1 && a.strides()[axis] != stride) {
      return false;
    }
    stride *= a.shape(axis);
  }
  return true;
}

mx::array copy_in_row_order(const mx::array& a, char* to) {
  std::optional<mx::array> fresh;
  if (!to) {
    fresh.emplace(a.shape(), a.dtype(), nullptr, std::vector<mx::array>{});
    fresh->set_data(mx::allocator::malloc(fresh->nbytes()));
    to = fresh->data<char>();
  }
  const std::size_t item = a.itemsize();
  const char* from = a.data<char>();
  std::vector<int> index(a.ndim(), 0);
  for (std::size_t n = 0; n < a.size(); ++n, to += item) {
    std::int64_t offset = 0;
    for (int axis = 0; axis < static_cast<int>(a.ndim()); ++axis) {
      offset += index[axis] * a.strides()[axis];
    }
    std::copy_n(from + offset * static_cast<std::int64_t>(item), item, to);
    for (int axis = a.ndim() - 1; axis >= 0 && ++index[axis] == a.shape(axis); --axis) {
      index[axis] = 0;
    }
  }
  return fresh ? *fresh : a;
}

// A matvec hands out its rows in blocks of this many weights (256 KB of float16): long
// enough runs of contiguous memory for the prefetches to stay ahead.
constexpr std::size_t kWeightsPerBlock = 1 << 17;

// x (..., depth) times w (n_w, depth) transposed, for few rows of x: w is read once, as in a
// matrix-vector product.  (OpenBLAS's sgemm first copies all of w into packed panels, which
// for one row of x doubles the memory traffic of a step's vocabulary projection.)
class MennyMatvec : public CpuProduct {
 public:
  using CpuProduct::CpuProduct;

  const char* name() const override {
    return "MennyMatvec";
  }

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = fresh_output(inputs, out);
#if defined(__x86_64__)
    const std::optional<mx::array> bias = inputs.size() > 2 ? std::optional(inputs[2]) : std::nullopt;
    // The weights come as they are (the decoder's are views of one buffer, which contiguous()
    // would copy every call); ones not in row order are copied here.
    encoder.dispatch([x = inputs[0], given = inputs[1], bias, out]() mutable {
      const mx::array w = in_row_order(given) ? given : copy_in_row_order(given);
      const std::size_t depth = w.shape(1), n_w = w.shape(0), n_x = x.size() / depth;
      const float* xs = x.data<float>();
      const float* bs = bias ? bias->data<float>() : nullptr;
      float* dst = out.data<float>();
      parallel_for(
          n_w, n_x * depth, 8,
          [=, matrix = Matrix(w)](std::size_t begin, std::size_t end) {
            matrix.times(xs, n_x, bs, depth, dst, n_w, begin, end);
          },
          kWeightsPerBlock);
    });
#endif
  }
};

// x (..., depth) @ w.T + bias, then GELU and + residual as asked, for w (n, depth) packed 32
// rows at a time into panels (strip_product): the encoder's products, the audio's keys and
// values, a prompt's products.  Unlike sgemm's, the packing is per strip, in the cache, and the
// bias, GELU and residual are applied while the result is there too.
class MennyPanelProduct : public ProductWithEpilogue<MennyPanelProduct> {
 public:
  using ProductWithEpilogue::ProductWithEpilogue;

  const char* name() const override {
    return "MennyPanelProduct";
  }

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = fresh_output(inputs, out);
#if defined(__x86_64__)
    const std::optional<mx::array> bias = this->bias(inputs, 2);
    const std::optional<mx::array> residual = this->residual(inputs);
    encoder.dispatch([x = inputs[0], given = inputs[1], bias, residual, gelu = gelu_, out]() mutable {
      const mx::array w = in_row_order(given) ? given : copy_in_row_order(given);
      const std::size_t depth = w.shape(1), n = out.shape(-1), rows = x.size() / depth;
      const float* xs = x.data<float>();
      const float* bs = bias ? bias->data<float>() : nullptr;
      const float* rs = residual ? residual->data<float>() : nullptr;
      float* dst = out.data<float>();
      parallel_for(n / kPanelWidth, rows * depth * kPanelWidth, 1,
                   [=, matrix = Matrix(w)](std::size_t begin, std::size_t end) {
                     matrix.with_weights([&](auto* weights) {
                       strip_product(xs, weights, depth, n, rows, bs, gelu, rs, dst, begin, end);
                     });
                   });
    });
#endif
  }

};

mx::Stream cpu_stream() {
  if (!uses_avx2()) {
    throw std::invalid_argument("these kernels need an x86-64 CPU with AVX2, FMA and F16C");
  }
  const mx::Stream stream = mx::to_stream({});
  if (stream.device != mx::Device::cpu) {
    throw std::invalid_argument("these kernels run on the CPU; the default device is a GPU");
  }
  return stream;
}

mx::array float32_rows(const mx::array& x, mx::Stream stream) {
  if (!mx::issubdtype(x.dtype(), mx::floating)) {
    throw std::invalid_argument("expected a floating-point array, got another dtype");
  }
  return mx::contiguous(mx::astype(x, mx::float32, stream), false, stream);
}

template <class Kernel>
mx::array apply(const mx::array& x) {
  const mx::Stream stream = cpu_stream();
  const mx::array in = float32_rows(x, stream);
  mx::array out(in.shape(), mx::float32, std::make_shared<Kernel>(stream), {in});
  return x.dtype() == mx::float32 ? out : mx::astype(out, x.dtype(), stream);
}

mx::array softmax(const mx::array& x) {
  return apply<MennySoftmax>(x);
}

mx::array gelu(const mx::array& x) {
  return apply<MennyGelu>(x);
}

mx::array multi_head_attention(const mx::array& q, const mx::array& k, const mx::array& v, int n_head, float scale,
                               const std::optional<mx::array>& offset) {
  if (q.ndim() != 3 || k.ndim() != 3 || v.ndim() != 3 || k.shape() != v.shape() || q.shape(0) != k.shape(0) ||
      q.shape(2) != k.shape(2)) {
    throw std::invalid_argument("expected q (batch, queries, state) and k, v (batch, keys, state)");
  }
  if (n_head <= 0 || q.shape(2) % n_head != 0 || (q.shape(2) / n_head) % 16 != 0 || k.shape(1) == 0) {
    throw std::invalid_argument("the state must split into heads of a multiple of 16, over at least one key");
  }
  if (!(scale > 0.0f)) {
    throw std::invalid_argument("the scale must be positive");
  }
  const mx::Stream stream = cpu_stream();
  std::vector<mx::array> inputs{float32_rows(q, stream), float32_rows(k, stream), float32_rows(v, stream)};
  if (offset) {
    if (offset->size() != 1 || offset->dtype() != mx::int32 || q.shape(1) > k.shape(1)) {
      throw std::invalid_argument("the offset is one int32 and the queries fit in the key cache");
    }
    inputs.push_back(*offset);
  }
  mx::array out(q.shape(), mx::float32, std::make_shared<MennyAttention>(stream, n_head, scale), std::move(inputs));
  return q.dtype() == mx::float32 ? out : mx::astype(out, q.dtype(), stream);
}

mx::array matvec(const mx::array& x, const mx::array& w, const std::optional<mx::array>& bias) {
  if (x.ndim() < 1 || w.ndim() != 2 || x.shape(-1) != w.shape(1) || w.shape(1) == 0) {
    throw std::invalid_argument("expected x (..., depth) and w (n, depth)");
  }
  if (bias && (bias->ndim() != 1 || bias->shape(0) != w.shape(0))) {
    throw std::invalid_argument("expected a bias (n,) for w (n, depth)");
  }
  const mx::Stream stream = cpu_stream();
  mx::Shape shape = x.shape();
  shape.back() = w.shape(0);
  // float16 weights stay float16: half the bytes to read.
  const mx::array weights = w.dtype() == mx::float16 || w.dtype() == mx::float32 ? w : mx::astype(w, mx::float32, stream);
  std::vector<mx::array> inputs{float32_rows(x, stream), weights};
  if (bias) {
    inputs.push_back(float32_rows(*bias, stream));
  }
  mx::array out(shape, mx::float32, std::make_shared<MennyMatvec>(stream), std::move(inputs));
  return x.dtype() == mx::float32 ? out : mx::astype(out, x.dtype(), stream);
}

mx::array panel_product(const mx::array& x, const mx::array& w, const std::optional<mx::array>& bias,
                        const std::optional<mx::array>& residual, bool gelu) {
  if (!uses_avx512()) {
    throw std::invalid_argument("the panel product needs AVX-512");
  }
  if (x.ndim() < 1 || x.dtype() != mx::float32 || w.ndim() != 2 || w.shape(0) % kPanelWidth != 0 ||
      w.shape(1) != x.shape(-1) || x.shape(-1) == 0 || (w.dtype() != mx::float32 && w.dtype() != mx::float16)) {
    throw std::invalid_argument("expected float32 x (..., depth) and a float32 or float16 matrix (n, depth), n a "
                                "multiple of 32");
  }
  const mx::Stream stream = cpu_stream();
  mx::Shape shape = x.shape();
  shape.back() = w.shape(0);
  if (bias && bias->shape() != mx::Shape{shape.back()}) {
    throw std::invalid_argument("expected a bias (n,)");
  }
  if (residual && residual->shape() != shape) {
    throw std::invalid_argument("expected a residual of the result's shape");
  }
  // w as it is: a view into a larger buffer (a decoder's weights, see the CPU backend's _store_weights_in_half)
  // would be copied by a contiguous() node.
  std::vector<mx::array> inputs{float32_rows(x, stream), w};
  if (bias) {
    inputs.push_back(float32_rows(*bias, stream));
  }
  if (residual) {
    inputs.push_back(float32_rows(*residual, stream));
  }
  return mx::array(shape, mx::float32, std::make_shared<MennyPanelProduct>(stream, bias.has_value(), gelu,
                                                                           residual.has_value()),
                   std::move(inputs));
}

mx::array layer_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, float eps) {
  if (x.ndim() < 1 || x.dtype() != mx::float32 || weight.shape() != mx::Shape{x.shape(-1)} ||
      bias.shape() != weight.shape()) {
    throw std::invalid_argument("expected x (..., n) float32 and a weight and bias (n,)");
  }
  const mx::Stream stream = cpu_stream();
  std::vector<mx::array> inputs{float32_rows(x, stream), float32_rows(weight, stream), float32_rows(bias, stream)};
  return mx::array(x.shape(), mx::float32, std::make_shared<MennyLayerNorm>(stream, eps), std::move(inputs));
}

}  // namespace menny
