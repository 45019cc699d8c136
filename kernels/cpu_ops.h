// The ops of the specray_cpu_attention module, one definition each in its .cpp file; declared
// here for the files that call across them (the bindings, the fused decoder layer).
#pragma once

#include <torch/extension.h>

#include <tuple>
#include <vector>

// cpu_attention.cpp
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor query_start_loc,
                              torch::Tensor seq_lens, double scale, int64_t window, double softcap,
                              bool causal);
// cpu_rowwise.cpp
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps, bool adds_one);
void rotary_(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin);
torch::Tensor gated_activation(const torch::Tensor& x, bool gelu);
// cpu_layer.cpp: binds `decoder_layer`; `injected_layer` is called by cpu_draft_block.cpp
void bind_decoder_layer(pybind11::module& m);
torch::Tensor injected_layer(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                             const std::vector<int64_t>& sizes, const std::vector<int64_t>& heads, double eps,
                             bool gelu, const torch::Tensor& cos, const torch::Tensor& sin,
                             const torch::Tensor& context_k, const torch::Tensor& context_v,
                             const torch::Tensor& context_lens, double scale,
                             std::vector<torch::Tensor>* own_kv = nullptr);
// cpu_draft_block.cpp
void bind_draft_block(pybind11::module& m);
// cpu_select.cpp
std::tuple<torch::Tensor, torch::Tensor> row_topk(const torch::Tensor& x, int64_t k);
// cpu_markov.cpp
std::vector<torch::Tensor> markov_candidates_block(
    const torch::Tensor& top_logits, const torch::Tensor& top_cols, const torch::Tensor& anchor,
    const torch::Tensor& temperature, const torch::Tensor& uniforms, const torch::Tensor& w1,
    const torch::Tensor& w2, const c10::optional<torch::Tensor>& conf_h,
    const c10::optional<torch::Tensor>& conf_e, const torch::Tensor& conf_scale,
    const c10::optional<torch::Tensor>& token_ids, int64_t columns, bool return_probs);
// cpu_gemm.cpp
bool has_bf16_gemm();
torch::Tensor pack_bf16_weight(const torch::Tensor& weight);
torch::Tensor linear_bf16(const torch::Tensor& x, const torch::Tensor& packed, int64_t n,
                          const c10::optional<torch::Tensor>& bias);
