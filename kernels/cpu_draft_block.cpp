// A trained drafter's proposal forward in few calls on the CPU (bf16, our packed GEMM). DSpark/DFlash:
// the new context rows (fused target features H_ctx and each layer's KV), then the whole block:
// slot inputs [anchor, MASK × (T−1)] (through the state-input projection where the drafter has
// one), RoPE at the slots' positions, the injected layers over the cached context KV, the final
// norm and the LM head over the first `width` slots. EAGLE-3: one call per chain step, the step's
// input projection, its layer over the context and the earlier steps, the norm and the head. The
// same kernels in the same order as the Python modules; what goes away is the ~80 Python-level ops
// a proposal spent around them, which cost about as much as the drafter's weights take to stream.
#include <torch/extension.h>

#include "cpu_ops.h"

namespace {

// in_proj([norm(x); states]) of rows x, states [R, d]: a block slot's or a chain step's input.
torch::Tensor project_with_state(const torch::Tensor& x, const torch::Tensor& states, const torch::Tensor& embed_norm,
                                 const torch::Tensor& in_proj, double eps) {
  const auto joined = torch::cat({rms_norm(x, embed_norm, eps, false), states}, -1);
  return linear_bf16(joined, in_proj, x.size(1), c10::nullopt);
}

// Slot inputs [N, T, d]: the MASK embedding in every slot but the first, which holds the anchor's;
// with a state-input projection, in_proj([norm(slot input); H_ctx at anchor−1]).
torch::Tensor block_inputs(const torch::Tensor& anchor_embeds, const torch::Tensor& mask_embed, int64_t slots,
                           const c10::optional<torch::Tensor>& states,
                           const c10::optional<torch::Tensor>& embed_norm,
                           const c10::optional<torch::Tensor>& in_proj, double eps) {
  const int64_t n = anchor_embeds.size(0), d = anchor_embeds.size(1);
  TORCH_CHECK(mask_embed.dim() == 1 && mask_embed.size(0) == d, "draft_block: mask_embed must be [d]");
  auto x = mask_embed.expand({n, slots, d}).clone();
  x.select(1, 0).copy_(anchor_embeds);
  if (!in_proj.has_value()) return x;
  TORCH_CHECK(states.has_value() && embed_norm.has_value(), "draft_block: in_proj needs states and embed_norm");
  const auto slot_states = states->unsqueeze(1).expand({n, slots, d}).reshape({n * slots, d});
  return project_with_state(x.view({n * slots, d}), slot_states, *embed_norm, *in_proj, eps).view({n, slots, d});
}

// fp32 logits [R, K] of final-normed states [R, d] through the packed head (softcapped where > 0).
torch::Tensor head_logits(const torch::Tensor& hidden, const torch::Tensor& head, int64_t head_rows, double softcap) {
  auto logits = linear_bf16(hidden, head, head_rows, c10::nullopt);
  if (softcap > 0) logits = torch::tanh(logits / softcap) * softcap;
  return logits.to(torch::kFloat);
}

// (cos, sin) [P, head_dim] at `positions` [P], as the Python RotaryEmbedding computes them (fp32
// angles, rotate-half layout, cast to the model's dtype).
std::pair<torch::Tensor, torch::Tensor> rotary_at(const torch::Tensor& positions, const torch::Tensor& inv_freq,
                                                  torch::ScalarType dtype) {
  const auto freqs = positions.to(torch::kFloat).unsqueeze(-1) * inv_freq.unsqueeze(0);
  const auto angles = torch::cat({freqs, freqs}, -1);
  return {angles.cos().to(dtype), angles.sin().to(dtype)};
}

// -> (H_ctx [T, d], per layer (k, v) [T, KV heads, head_dim]) of raw target features [T, m·d] at
// `positions`: fused = norm(fc(features)), then each layer's packed [k | v] product of the fused
// rows with RoPE on k (the context skips the layer's input norm).
std::tuple<torch::Tensor, std::vector<torch::Tensor>> draft_context(
    const torch::Tensor& features, const torch::Tensor& positions, const torch::Tensor& fc, int64_t d,
    const torch::Tensor& context_norm, double eps, const torch::Tensor& inv_freq,
    const std::vector<torch::Tensor>& kv_weights, const std::vector<int64_t>& heads) {
  TORCH_CHECK(heads.size() == 2, "draft_context: heads = (KV heads, head_dim)");
  const int64_t tokens = features.size(0), num_kv_heads = heads[0], head_dim = heads[1];
  const int64_t width = num_kv_heads * head_dim;
  const auto fused = rms_norm(linear_bf16(features, fc, d, c10::nullopt), context_norm, eps, false);
  const auto [cos, sin] = rotary_at(positions, inv_freq, features.scalar_type());
  std::vector<torch::Tensor> kv;
  for (const auto& weight : kv_weights) {
    const auto both = linear_bf16(fused, weight, 2 * width, c10::nullopt);
    auto k = both.narrow(1, 0, width).view({tokens, num_kv_heads, head_dim});
    rotary_(k, cos, sin);
    kv.push_back(k);
    kv.push_back(both.narrow(1, width, width).view({tokens, num_kv_heads, head_dim}));
  }
  return {fused, kv};
}

// -> (final-normed slot states [N, width, d], fp32 logits [N, width, K] over the head's rows).
// `layers[l]` and `sizes` are injected_layer's weights and output widths; context_k/v[l] [N, L, ...]
// the cached context KV of layer l, of which block b sees rows j < anchors[b].
std::tuple<torch::Tensor, torch::Tensor> draft_block(
    const torch::Tensor& anchor_embeds, const torch::Tensor& mask_embed, const torch::Tensor& anchors,
    int64_t slots, const c10::optional<torch::Tensor>& states, const c10::optional<torch::Tensor>& embed_norm,
    const c10::optional<torch::Tensor>& in_proj, const torch::Tensor& inv_freq,
    const std::vector<std::vector<torch::Tensor>>& layers, const std::vector<int64_t>& sizes,
    const std::vector<int64_t>& heads, double eps, bool gelu, const std::vector<torch::Tensor>& context_k,
    const std::vector<torch::Tensor>& context_v, double scale, const torch::Tensor& norm,
    const torch::Tensor& head, int64_t head_rows, int64_t width, double softcap) {
  TORCH_CHECK(layers.size() == context_k.size() && layers.size() == context_v.size() && !layers.empty(),
              "draft_block: one context KV per layer");
  TORCH_CHECK(width >= 1 && width <= slots, "draft_block: width must be in [1, slots]");
  const int64_t n = anchor_embeds.size(0), d = anchor_embeds.size(1);
  const auto positions = (anchors.unsqueeze(1) + torch::arange(slots, anchors.options())).reshape({-1});
  const auto [cos, sin] = rotary_at(positions, inv_freq, anchor_embeds.scalar_type());
  auto x = block_inputs(anchor_embeds, mask_embed, slots, states, embed_norm, in_proj, eps).view({n * slots, d});
  for (size_t l = 0; l < layers.size(); ++l)
    x = injected_layer(x, layers[l], sizes, heads, eps, gelu, cos, sin, context_k[l], context_v[l], anchors, scale);
  const auto hidden = rms_norm(x, norm, eps, false).view({n, slots, d}).narrow(1, 0, width).contiguous();
  return {hidden, head_logits(hidden.view({n * width, d}), head, head_rows, softcap).view({n, width, head_rows})};
}

// -> (layer output before the final norm [N, d], fp32 logits [N, K], the step's k and v [N, KV
// heads, head_dim], RoPE on k) of one EAGLE-3 chain step per row: input in_proj([norm(token_embeds);
// states]) at `positions`, the injected layer over rows j < context_lens[b] of context_k/v [N, L, ...]
// (the row's context, then its earlier steps) and itself, the final norm and the head.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> draft_chain_step(
    const torch::Tensor& token_embeds, const torch::Tensor& states, const torch::Tensor& positions,
    const torch::Tensor& embed_norm, const torch::Tensor& in_proj, const torch::Tensor& inv_freq,
    const std::vector<torch::Tensor>& layer, const std::vector<int64_t>& sizes, const std::vector<int64_t>& heads,
    double eps, bool gelu, const torch::Tensor& context_k, const torch::Tensor& context_v,
    const torch::Tensor& context_lens, double scale, const torch::Tensor& norm, const torch::Tensor& head,
    int64_t head_rows, double softcap) {
  TORCH_CHECK(token_embeds.dim() == 2 && states.sizes() == token_embeds.sizes() &&
                  positions.numel() == token_embeds.size(0),
              "draft_chain_step: token_embeds and states [N, d], positions [N]");
  const auto [cos, sin] = rotary_at(positions, inv_freq, token_embeds.scalar_type());
  const auto x = project_with_state(token_embeds, states, embed_norm, in_proj, eps);
  std::vector<torch::Tensor> own_kv;
  const auto out = injected_layer(x, layer, sizes, heads, eps, gelu, cos, sin, context_k, context_v, context_lens,
                                  scale, &own_kv);
  const auto logits = head_logits(rms_norm(out, norm, eps, false), head, head_rows, softcap);
  return {out, logits, own_kv[0], own_kv[1]};
}

}  // namespace

void bind_draft_block(pybind11::module& m) {
  m.def("draft_context", &draft_context, "a DSpark/DFlash drafter's context rows: H_ctx and each layer's KV (CPU, bf16)");
  m.def("draft_block", &draft_block, "a DSpark/DFlash block forward and LM head in one call (CPU, bf16)");
  m.def("draft_chain_step", &draft_chain_step, "one EAGLE-3 chain step and its LM head in one call (CPU, bf16)");
}
