// MLX primitives: what every kernel's primitive shares (the stream's encoder, a fresh or donated
// output, arrays read in row order), and the functions that build the primitives' arrays, which
// the bindings expose.
#pragma once

#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"

namespace menny {

// The stream's encoder, told what a primitive reads and writes.
mx::cpu::CommandEncoder& encoder_for(mx::Stream stream, const std::vector<mx::array>& inputs,
                                     std::vector<mx::array> outputs);

class CpuKernel : public mx::UnaryPrimitive {
 public:
  using mx::UnaryPrimitive::UnaryPrimitive;

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error(std::string(name()) + " runs on the CPU only; use MLX's own op on a GPU");
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return std::string(name()) == other.name();
  }

 protected:
  // Gives `out` a fresh buffer and tells the stream what is read and written.
  mx::cpu::CommandEncoder& fresh_output(const std::vector<mx::array>& inputs, mx::array& out) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    return encode(inputs, out);
  }

  // For element-wise kernels: `out` takes over the input's buffer when it may (else a fresh
  // one), and the stream is told what is read and written.
  mx::cpu::CommandEncoder& output_like_input(const std::vector<mx::array>& inputs, mx::array& out) {
    if (inputs[0].is_donatable()) {
      out.copy_shared_buffer(inputs[0]);
    } else {
      out.set_data(mx::allocator::malloc(out.nbytes()));
    }
    return encode(inputs, out);
  }

 private:
  mx::cpu::CommandEncoder& encode(const std::vector<mx::array>& inputs, mx::array& out) {
    return encoder_for(stream(), inputs, {out});
  }
};

// x (..., depth) times w (n, ...) transposed, x and w its first inputs: (..., n).
class CpuProduct : public CpuKernel {
 public:
  using CpuKernel::CpuKernel;

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    mx::Shape shape = inputs[0].shape();
    shape.back() = inputs[1].shape(0);
    return {shape};
  }
};

// A product whose result gets a bias, GELU and a residual as asked (the panel product, the
// quantized one): two nodes of one kind compute the same when those three choices are the same.
// The bias is input `bias_input` where given, the residual the last input.
template <class Kind>
class ProductWithEpilogue : public CpuProduct {
 public:
  ProductWithEpilogue(mx::Stream stream, bool has_bias, bool gelu, bool has_residual)
      : CpuProduct(stream), has_bias_(has_bias), gelu_(gelu), has_residual_(has_residual) {}

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto* same = dynamic_cast<const Kind*>(&other);
    return same && same->has_bias_ == has_bias_ && same->gelu_ == gelu_ && same->has_residual_ == has_residual_;
  }

 protected:
  std::optional<mx::array> bias(const std::vector<mx::array>& inputs, std::size_t bias_input) const {
    return has_bias_ ? std::optional(inputs[bias_input]) : std::nullopt;
  }

  std::optional<mx::array> residual(const std::vector<mx::array>& inputs) const {
    return has_residual_ ? std::optional(inputs.back()) : std::nullopt;
  }

  bool gelu_;

 private:
  bool has_bias_;
  bool has_residual_;
};

// Whether a's elements lie in row-major order in its memory (a view into a larger buffer too).
bool in_row_order(const mx::array& a);

// a's elements in row-major order, into `to` (a's size times its item size), or into a new array.
mx::array copy_in_row_order(const mx::array& a, char* to = nullptr);

// The default stream, if the kernels can run on it (every primitive is built through here, so
// none is evaluated on a CPU without the AVX2 code).
mx::Stream cpu_stream();

// A row-major float32 version of x (no copy when it is one already).
mx::array float32_rows(const mx::array& x, mx::Stream stream);

// The arrays the bindings return, each computed by a primitive (see bindings.cpp for what each
// takes and gives).
mx::array softmax(const mx::array& x);
mx::array gelu(const mx::array& x);
mx::array multi_head_attention(const mx::array& q, const mx::array& k, const mx::array& v, int n_head, float scale,
                               const std::optional<mx::array>& offset);
mx::array matvec(const mx::array& x, const mx::array& w, const std::optional<mx::array>& bias);
mx::array panel_product(const mx::array& x, const mx::array& w, const std::optional<mx::array>& bias,
                        const std::optional<mx::array>& residual, bool gelu);
mx::array quantized_product(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
                            const std::optional<mx::array>& bias, const std::optional<mx::array>& residual, bool gelu);
mx::array layer_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, float eps);
std::vector<mx::array> decoder_layer(const mx::array& x, const mx::array& offset, const mx::array& key_cache,
                                     const mx::array& value_cache, const mx::array& audio, const mx::array& audio_second,
                                     const std::map<std::string, mx::array>& weights, int n_head, float eps,
                                     bool over_features, int group);
mx::array reorder_rows(const mx::array& cache, const mx::array& sources, const mx::array& positions);
std::vector<mx::array> token_choice(const mx::array& logits, const mx::array& forbidden, const mx::array& ranges,
                                    int timestamp_begin, int k);

}  // namespace menny
