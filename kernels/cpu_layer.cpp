// A whole Llama-style decoder layer in one call on the CPU (bf16, our packed GEMM): the same
// kernels the Python modules call, in the same order, so the result is bit-identical to theirs;
// what goes away is ~20 Python-level ops per layer (module calls, views, dispatch), which at one
// token per step cost about as much as the layer's attention.
#include <torch/extension.h>

#include "cpu_ops.h"

namespace {

// x [T, d] -> the layer's output [T, d]:
//   h = x + o(attention(rope(qkv(norm1(x)))));  out = h + down(act(gate) * up(norm2(h)))
// `weights` = (norm1, qkv packed, o packed, norm2, gate_up packed, down packed); `sizes` = their
// output widths (qkv, o, gate_up, down); `heads` = (query heads, KV heads, head dim).
torch::Tensor decoder_layer(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                            const std::vector<int64_t>& sizes, const c10::optional<torch::Tensor>& qkv_bias,
                            const std::vector<int64_t>& heads, double eps, bool gelu, const torch::Tensor& cos,
                            const torch::Tensor& sin, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                            const torch::Tensor& slot_mapping, const torch::Tensor& block_tables,
                            const torch::Tensor& query_start_loc, const torch::Tensor& seq_lens, double scale,
                            int64_t window) {
  TORCH_CHECK(weights.size() == 6 && sizes.size() == 4 && heads.size() == 3, "decoder_layer: bad arguments");
  const int64_t tokens = x.size(0), num_heads = heads[0], num_kv_heads = heads[1], head_dim = heads[2];
  const int64_t q_width = num_heads * head_dim, kv_width = num_kv_heads * head_dim;
  const auto qkv = linear_bf16(rms_norm(x, weights[0], eps, false), weights[1], sizes[0], qkv_bias);
  auto q = qkv.narrow(1, 0, q_width).view({tokens, num_heads, head_dim});
  auto k = qkv.narrow(1, q_width, kv_width).view({tokens, num_kv_heads, head_dim});
  const auto v = qkv.narrow(1, q_width + kv_width, kv_width).view({tokens, num_kv_heads, head_dim});
  rotary_(q, cos, sin);
  rotary_(k, cos, sin);
  k_cache.view({-1, num_kv_heads, head_dim}).index_put_({slot_mapping}, k);
  v_cache.view({-1, num_kv_heads, head_dim}).index_put_({slot_mapping}, v);
  const auto attn = paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, window, 0.0);
  const auto h = x + linear_bf16(attn.reshape({tokens, q_width}), weights[2], sizes[1], c10::nullopt);
  const auto gate_up = linear_bf16(rms_norm(h, weights[3], eps, false), weights[4], sizes[2], c10::nullopt);
  return h + linear_bf16(gated_activation(gate_up, gelu), weights[5], sizes[3], c10::nullopt);
}

}  // namespace

void bind_decoder_layer(pybind11::module& m) {
  m.def("decoder_layer", &decoder_layer, "a Llama-style decoder layer in one call (CPU, bf16)");
}
