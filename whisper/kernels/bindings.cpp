// The Python module: each kernel's array-building function with its arguments and docstring.
#include <sys/mman.h>

#include <nanobind/nanobind.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "primitives.h"
#include "threads.h"

namespace nb = nanobind;

namespace {

// Linux 6.1's madvise: back a range by huge pages now (copying what is there), whatever the
// system's transparent-huge-page setting short of "never".
#if defined(__linux__) && !defined(MADV_COLLAPSE)
#define MADV_COLLAPSE 25
#endif

bool huge_pages(mx::array a) {
  mx::eval(a);
#if defined(__linux__)
  constexpr std::uintptr_t kHugePage = std::uintptr_t{2} << 20;
  const auto start = reinterpret_cast<std::uintptr_t>(a.data<char>());
  const std::uintptr_t first = (start + kHugePage - 1) & ~(kHugePage - 1);
  const std::uintptr_t last = (start + a.data_size() * a.itemsize()) & ~(kHugePage - 1);
  return last > first && madvise(reinterpret_cast<void*>(first), last - first, MADV_COLLAPSE) == 0;
#else
  return false;
#endif
}

}  // namespace

NB_MODULE(_fast_ops, m) {
  m.doc() = "Menny's CPU kernels for softmax, GELU and attention as MLX primitives";
  m.def("softmax", &menny::softmax, nb::arg("x"),
        "Softmax over the last axis, like mx.softmax(x, axis=-1, precise=True).");
  m.def("gelu", &menny::gelu, nb::arg("x"), "Exact GELU, x * Phi(x), like mlx.nn.gelu.");
  m.def("attention", &menny::multi_head_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("n_head"),
        nb::arg("scale"), nb::arg("offset") = nb::none(),
        "Attention of q (batch, queries, state) over k, v (batch, keys, state) with n_head heads, "
        "heads merged: (batch, queries, state).  Unmasked, or with offset (an int32 array of one element) "
        "causal over a key cache: query i sees keys [0, offset + i].  Needs AVX2+FMA and heads of a "
        "multiple of 16.");
  m.def("matvec", &menny::matvec, nb::arg("x"), nb::arg("w"), nb::arg("bias") = nb::none(),
        "x (..., depth) @ w.T (+ bias) for w (n, depth), float32 or float16, reading w once: for a few rows "
        "of x.  The result is float32 (x's dtype if another).");
  m.def("panel_product", &menny::panel_product, nb::arg("x"), nb::arg("w"), nb::arg("bias") = nb::none(),
        nb::arg("residual") = nb::none(), nb::arg("gelu") = false,
        "x (..., depth) float32 @ w.T (+ bias), exact GELU if asked, + residual if given, for w (n, depth) "
        "float32 or float16, n a multiple of 32, packed 32 rows at a time into panels by each call.  "
        "Needs AVX-512.");
  m.def("quantized_product", &menny::quantized_product, nb::arg("x"), nb::arg("w"), nb::arg("scales"),
        nb::arg("biases"), nb::arg("bias") = nb::none(), nb::arg("residual") = nb::none(), nb::arg("gelu") = false,
        "x (..., depth) float32 @ W.T (+ bias), exact GELU if asked, + residual if given, for 8-bit weights W "
        "(n, depth) in MLX's affine format, groups of 64 (mx.quantize(W, 64, 8): w (n, depth / 4) uint32, "
        "scales and biases (n, depth / 64)), n a multiple of 64.  Each row of x is quantized to int8 "
        "(symmetric: x ~ s p, s = max |x| / 127, p rounded to nearest), and the result is s p times W's "
        "values, each group's products summed exactly as integers.  AVX-512 VNNI or AVX2, the same bits.");
  m.def("uses_avx512", [] { return menny::uses_avx512(); }, "Whether this CPU runs the AVX-512 panel product.");
  m.def("uses_avx512_vnni", [] { return menny::uses_avx512_vnni(); },
        "Whether this CPU runs the AVX-512 VNNI quantized product (else its AVX2 one).");
  m.def("layer_norm", &menny::layer_norm, nb::arg("x"), nb::arg("weight"), nb::arg("bias"), nb::arg("eps"),
        "Layer norm over the last axis of float32 x, the same bits as mx.fast.layer_norm.");
  m.def("decoder_layer", &menny::decoder_layer, nb::arg("x"), nb::arg("offset"), nb::arg("key_cache"),
        nb::arg("value_cache"), nb::arg("audio"), nb::arg("audio_second"), nb::arg("weights"), nb::arg("n_head"),
        nb::arg("eps"), nb::arg("over_features") = false, nb::arg("group") = 1,
        "One token's step through a decoder layer: x (rows, 1, state) at position offset (an int32 array "
        "of one element), the self-attention caches (rows, n_ctx, state), the keys and values of "
        "n_audio = rows / group audios (n_audio, frames, state), row r attending over audio r // group, all "
        "float32, and the weights by the block's parameter paths (dict(tree_flatten(block.parameters())): "
        "attn_ln.weight, attn.query.bias, mlp1.weight, ...; matrices float32 or float16, the others "
        "float32).  With over_features (AVX-512): the audio features f (n_audio, frames, state) as frame "
        "panels (n_audio, frames / 32 rounded up, state, 32): [a, p, c, j] = f[a, 32 p + j, c], 0 past the "
        "last frame; and channel panels (n_audio, state / 32, frames, 32): [a, p, i, j] = f[a, i, 32 p + j], "
        "in place of the keys and values (the weights then include cross_attn.key.weight, "
        "cross_attn.value.weight and .bias).  Returns the output and the caches, written in place.");
  m.def("token_choice", &menny::token_choice, nb::arg("logits"), nb::arg("forbidden"), nb::arg("ranges"),
        nb::arg("timestamp_begin"), nb::arg("k") = 0,
        "Each row's likeliest allowed token (int32, (batch,)) and its log-probability among the allowed "
        "ones (float32), or with k > 0 its k likeliest, largest first, the first of equals first ((batch, "
        "k) each): forbidden (1 or batch, vocab) bool and ranges (batch, n, 2) of [start, stop) forbid "
        "tokens; from timestamp_begin on (vocab or more: no timestamps) the tokens are timestamps, and "
        "when all of them together are likelier than the likeliest text token, text is forbidden.");
  m.def("reorder_rows", &menny::reorder_rows, nb::arg("cache"), nb::arg("sources"), nb::arg("positions"),
        "A self-attention cache (rows, n_ctx, state) with row i's positions [start, stop) (positions: an "
        "integer array of two elements) taken from row sources[i] ((rows,) integers), the other positions "
        "as they were: in place (the result is the cache's memory), copying only the rows whose source "
        "differs.");
  m.def("huge_pages", &huge_pages, nb::arg("a"),
        "Evaluates a and asks Linux to back the 2 MB pages wholly inside its memory by huge pages "
        "(MADV_COLLAPSE); whether it did.");
  m.def("uses_avx2", [] { return menny::uses_avx2(); }, "Whether this CPU runs the AVX2+FMA kernels.");
  m.def("threads", [] { return menny::kernel_threads(); }, "How many threads a large op is split across.");
}
