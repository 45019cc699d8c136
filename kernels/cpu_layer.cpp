// A whole decoder layer in one call on the CPU (bf16, our packed GEMM): the same kernels the
// Python modules call, in the same order, so the result is bit-identical to theirs; what goes away
// is ~20 Python-level ops per layer (module calls, views, dispatch), which at one token per step
// cost about as much as the layer's attention. Two layers: the target's Llama-style layer over its
// paged KV cache, and a drafter's injected layer, whose block of queries attends to the cached
// context KV and to the whole block.
#include <torch/extension.h>

#include "cpu_ops.h"

namespace {

// `weights` = (norm1, qkv packed, o packed, norm2, gate_up packed, down packed); `sizes` = their
// output widths (qkv, o, gate_up, down); `heads` = (query heads, KV heads, head dim).
struct LayerWeights {
  const std::vector<torch::Tensor>& weights;
  const std::vector<int64_t>& sizes;
  const std::vector<int64_t>& heads;
  double eps;
  bool gelu;
};

struct RotatedQKV {
  torch::Tensor q, k, v;  // [T, heads, head_dim] views of one qkv product, RoPE applied to q and k
};

RotatedQKV rotated_qkv(const torch::Tensor& x, const LayerWeights& w, const c10::optional<torch::Tensor>& qkv_bias,
                       const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(w.weights.size() == 6 && w.sizes.size() == 4 && w.heads.size() == 3, "layer: bad arguments");
  const int64_t tokens = x.size(0), num_heads = w.heads[0], num_kv_heads = w.heads[1], head_dim = w.heads[2];
  const int64_t q_width = num_heads * head_dim, kv_width = num_kv_heads * head_dim;
  const auto qkv = linear_bf16(rms_norm(x, w.weights[0], w.eps, false), w.weights[1], w.sizes[0], qkv_bias);
  auto q = qkv.narrow(1, 0, q_width).view({tokens, num_heads, head_dim});
  auto k = qkv.narrow(1, q_width, kv_width).view({tokens, num_kv_heads, head_dim});
  auto v = qkv.narrow(1, q_width + kv_width, kv_width).view({tokens, num_kv_heads, head_dim});
  rotary_(q, cos, sin);
  rotary_(k, cos, sin);
  return {q, k, v};
}

// h = x + o(attn);  out = h + down(act(gate) * up(norm2(h)))
torch::Tensor attention_residual_and_mlp(const torch::Tensor& x, const torch::Tensor& attn, const LayerWeights& w) {
  const auto h = x + linear_bf16(attn.reshape({x.size(0), -1}), w.weights[2], w.sizes[1], c10::nullopt);
  const auto gate_up = linear_bf16(rms_norm(h, w.weights[3], w.eps, false), w.weights[4], w.sizes[2], c10::nullopt);
  return h + linear_bf16(gated_activation(gate_up, w.gelu), w.weights[5], w.sizes[3], c10::nullopt);
}

// x [T, d] -> the layer's output [T, d]:
//   h = x + o(attention(rope(qkv(norm1(x)))));  out = h + down(act(gate) * up(norm2(h)))
torch::Tensor decoder_layer(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                            const std::vector<int64_t>& sizes, const c10::optional<torch::Tensor>& qkv_bias,
                            const std::vector<int64_t>& heads, double eps, bool gelu, const torch::Tensor& cos,
                            const torch::Tensor& sin, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                            const torch::Tensor& slot_mapping, const torch::Tensor& block_tables,
                            const torch::Tensor& query_start_loc, const torch::Tensor& seq_lens, double scale,
                            int64_t window) {
  const LayerWeights w{weights, sizes, heads, eps, gelu};
  const auto qkv = rotated_qkv(x, w, qkv_bias, cos, sin);
  k_cache.view({-1, heads[1], heads[2]}).index_put_({slot_mapping}, qkv.k);
  v_cache.view({-1, heads[1], heads[2]}).index_put_({slot_mapping}, qkv.v);
  const auto attn = paged_attention(qkv.q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                                    window, 0.0, true);
  return attention_residual_and_mlp(x, attn, w);
}

}  // namespace

// x [B·T, d], B blocks of T query slots -> the layer's output [B·T, d]. Block b's slots attend to
// its context KV rows j < context_lens[b] of context_k/v [B, L, KV heads, head_dim] and to all T
// of its own slots (both ways). The keys are pooled into one table of single-row pages (the
// contexts, then the blocks), so the batch-invariant paged kernel runs them non-causally. Where
// `own_kv` is given it receives the slots' (k, v) [B·T, KV heads, head_dim], RoPE on k: what a
// chain drafter appends to its context for the next step.
torch::Tensor injected_layer(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                             const std::vector<int64_t>& sizes, const std::vector<int64_t>& heads, double eps,
                             bool gelu, const torch::Tensor& cos, const torch::Tensor& sin,
                             const torch::Tensor& context_k, const torch::Tensor& context_v,
                             const torch::Tensor& context_lens, double scale, std::vector<torch::Tensor>* own_kv) {
  const LayerWeights w{weights, sizes, heads, eps, gelu};
  const int64_t blocks = context_k.size(0), context = context_k.size(1), rows = x.size(0);
  TORCH_CHECK(context_k.dim() == 4 && context_v.sizes() == context_k.sizes() && blocks > 0 &&
                  rows % blocks == 0 && context_lens.numel() == blocks,
              "injected_layer: context KV must be [B, L, KV heads, head_dim] for B blocks of x's rows");
  const int64_t slots = rows / blocks, num_kv_heads = heads[1], head_dim = heads[2];
  const auto qkv = rotated_qkv(x, w, c10::nullopt, cos, sin);
  const auto pool_k = torch::cat({context_k.reshape({blocks * context, num_kv_heads, head_dim}), qkv.k})
                          .view({-1, 1, num_kv_heads, head_dim});
  const auto pool_v = torch::cat({context_v.reshape({blocks * context, num_kv_heads, head_dim}), qkv.v})
                          .view({-1, 1, num_kv_heads, head_dim});
  const auto lens_in = context_lens.to(torch::kInt64).contiguous();
  const int64_t* lens_ptr = lens_in.data_ptr<int64_t>();
  auto tables = torch::zeros({blocks, context + slots}, torch::kInt32);
  auto starts = torch::empty({blocks + 1}, torch::kInt32);
  auto lens = torch::empty({blocks}, torch::kInt32);
  int32_t* table = tables.data_ptr<int32_t>();
  for (int64_t b = 0; b < blocks; ++b) {
    TORCH_CHECK(lens_ptr[b] >= 0 && lens_ptr[b] <= context, "injected_layer: a context length exceeds L");
    int32_t* row = table + b * (context + slots);
    for (int64_t j = 0; j < lens_ptr[b]; ++j) row[j] = static_cast<int32_t>(b * context + j);
    for (int64_t t = 0; t < slots; ++t) row[lens_ptr[b] + t] = static_cast<int32_t>(blocks * context + b * slots + t);
    starts.data_ptr<int32_t>()[b] = static_cast<int32_t>(b * slots);
    lens.data_ptr<int32_t>()[b] = static_cast<int32_t>(lens_ptr[b] + slots);
  }
  starts.data_ptr<int32_t>()[blocks] = static_cast<int32_t>(rows);
  const auto attn = paged_attention(qkv.q, pool_k, pool_v, tables, starts, lens, scale, 0, 0.0, false);
  if (own_kv != nullptr) *own_kv = {qkv.k, qkv.v};
  return attention_residual_and_mlp(x, attn, w);
}

void bind_decoder_layer(pybind11::module& m) {
  m.def("decoder_layer", &decoder_layer, "a Llama-style decoder layer in one call (CPU, bf16)");
}
