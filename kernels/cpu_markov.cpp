// The Markov block sampler's candidate path on the CPU (`markov_sampling.py` is its PyTorch twin):
// per row, slot by slot, the M candidate columns' logits plus the Markov bias W2[col] · W1[x_{k−1}],
// the confidence c_k from the same W1 row, then argmax (T = 0) or an inverse-CDF draw at T. In
// PyTorch that loop is ~10 small ops per slot (~0.1 ms each slot at batch 1); here it is a few µs.
//
// Every distribution is fp32 and the returned probability is the one each token was drawn with, so
// verification stays exact. Rows are independent (split between threads, never within one).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

}  // namespace

std::vector<torch::Tensor> markov_candidates_block(
    const torch::Tensor& top_logits, const torch::Tensor& top_cols, const torch::Tensor& anchor,
    const torch::Tensor& temperature, const torch::Tensor& uniforms, const torch::Tensor& w1,
    const torch::Tensor& w2, const c10::optional<torch::Tensor>& conf_h,
    const c10::optional<torch::Tensor>& conf_e, const torch::Tensor& conf_scale,
    const c10::optional<torch::Tensor>& token_ids, int64_t columns, bool return_probs) {
  TORCH_CHECK(top_logits.dim() == 3 && top_logits.scalar_type() == at::kFloat && top_logits.is_contiguous(),
              "markov_candidates_block: top_logits must be a contiguous float32 [B, slots, M]");
  TORCH_CHECK(top_cols.sizes() == top_logits.sizes() && top_cols.scalar_type() == at::kLong &&
                  top_cols.is_contiguous(),
              "markov_candidates_block: top_cols must be a contiguous int64 tensor shaped like top_logits");
  const int64_t batch = top_logits.size(0), slots = top_logits.size(1), m = top_logits.size(2);
  const int64_t rank = w1.size(1);
  TORCH_CHECK(w1.scalar_type() == at::kFloat && w2.scalar_type() == at::kFloat && w1.is_contiguous() &&
                  w2.is_contiguous() && w2.size(1) == rank && w2.size(0) == columns,
              "markov_candidates_block: W1 [V, r] and W2 [C, r] must be contiguous float32");
  TORCH_CHECK(anchor.scalar_type() == at::kLong && anchor.numel() == batch && temperature.numel() == batch &&
                  temperature.scalar_type() == at::kFloat && uniforms.scalar_type() == at::kFloat &&
                  uniforms.is_contiguous() && uniforms.size(0) == batch && uniforms.size(1) == slots,
              "markov_candidates_block: anchor [B] int64, temperature [B] and uniforms [B, slots] float32");
  const bool with_conf = conf_h.has_value();
  TORCH_CHECK(!with_conf || (conf_e.has_value() && conf_h->is_contiguous() && conf_e->numel() == rank &&
                             conf_scale.numel() >= slots),
              "markov_candidates_block: confidence needs conf_h [B, slots], conf_e [r], conf_scale [slots]");

  auto options = top_logits.options();
  auto tokens = torch::empty({batch, slots}, options.dtype(at::kLong));
  auto token_probs = torch::empty({batch, slots}, options);
  auto probs = return_probs ? torch::zeros({batch, slots, columns}, options) : torch::empty({0}, options);
  auto confidence = with_conf ? torch::empty({batch, slots}, options) : torch::empty({0}, options);

  const float* logits_p = top_logits.data_ptr<float>();
  const int64_t* cols_p = top_cols.data_ptr<int64_t>();
  const auto anchor_c = anchor.contiguous();
  const auto temp_c = temperature.contiguous();
  const int64_t* anchor_p = anchor_c.data_ptr<int64_t>();
  const float* temp_p = temp_c.data_ptr<float>();
  const float* uni_p = uniforms.data_ptr<float>();
  const float* w1_p = w1.data_ptr<float>();
  const float* w2_p = w2.data_ptr<float>();
  const auto scale_c = conf_scale.contiguous();
  const float* scale_p = scale_c.data_ptr<float>();
  const float* conf_h_p = with_conf ? conf_h->data_ptr<float>() : nullptr;
  const auto conf_e_c = with_conf ? conf_e->contiguous() : torch::Tensor();
  const float* conf_e_p = with_conf ? conf_e_c.data_ptr<float>() : nullptr;
  const auto ids_c = token_ids.has_value() ? token_ids->contiguous() : torch::Tensor();
  const int64_t* ids_p = token_ids.has_value() ? ids_c.data_ptr<int64_t>() : nullptr;
  int64_t* tokens_p = tokens.data_ptr<int64_t>();
  float* token_probs_p = token_probs.data_ptr<float>();
  float* probs_p = return_probs ? probs.data_ptr<float>() : nullptr;
  float* conf_p = with_conf ? confidence.data_ptr<float>() : nullptr;

  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> z(m);
    for (int64_t b = begin; b < end; ++b) {
      const float temp = temp_p[b];
      const bool greedy = temp <= 0.0f;
      int64_t prev = anchor_p[b];
      for (int64_t k = 0; k < slots; ++k) {
        const int64_t slot = b * slots + k;
        const float* emb = w1_p + prev * rank;
        const float* logits = logits_p + slot * m;
        const int64_t* cols = cols_p + slot * m;
        for (int64_t j = 0; j < m; ++j) z[j] = logits[j] + dot(w2_p + cols[j] * rank, emb, rank);
        if (with_conf) {
          const float logit = (conf_h_p[slot] + dot(emb, conf_e_p, rank)) / scale_p[k];
          conf_p[slot] = 1.0f / (1.0f + std::exp(-logit));
        }
        int64_t pick = 0;
        for (int64_t j = 1; j < m; ++j)
          if (z[j] > z[pick]) pick = j;  // the first maximum, as argmax
        float chosen = 1.0f;
        if (!greedy) {
          const float inv_temp = 1.0f / std::max(temp, 1e-30f);
          const float top = z[pick] * inv_temp;
          float total = 0.0f;
          for (int64_t j = 0; j < m; ++j) total += (z[j] = std::exp(z[j] * inv_temp - top));
          for (int64_t j = 0; j < m; ++j) z[j] /= total;
          // Inverse CDF: the first column whose running sum exceeds u · (the sum's end).
          float cdf = 0.0f, run = 0.0f;
          for (int64_t j = 0; j < m; ++j) cdf += z[j];
          const float threshold = uni_p[slot] * cdf;
          pick = m - 1;
          for (int64_t j = 0; j < m; ++j) {
            run += z[j];
            if (run > threshold) {
              pick = j;
              break;
            }
          }
          chosen = z[pick];
        }
        const int64_t column = cols[pick];
        if (return_probs) {
          float* dist = probs_p + slot * columns;
          if (greedy)
            dist[column] = 1.0f;
          else
            for (int64_t j = 0; j < m; ++j) dist[cols[j]] = z[j];
        }
        token_probs_p[slot] = chosen;
        prev = ids_p ? ids_p[column] : column;
        tokens_p[slot] = prev;
      }
    }
  });
  return {tokens, token_probs, probs, confidence};
}
