// Row-wise top-k on the CPU: the k largest values of each row and their columns, for the Markov
// block sampler's candidate columns. torch.topk spends ~30 µs per 16k-column row at k = 64 (and
// argmax as much); a threshold scan that skips 16 columns at a time when none beats the k-th best
// does it in a few µs, since after the first few hundred columns almost nothing enters.
//
// Ties go to the lower column, so the result depends on the row alone (batch-invariant).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <tuple>

namespace {

constexpr int64_t kChunk = 16;

// Keeps best[0..k) sorted descending by (value, −column); `filled` of them are set.
inline void insert(float* best_v, int64_t* best_i, int64_t& filled, int64_t k, float v, int64_t i) {
  int64_t pos = filled < k ? filled++ : k - 1;
  while (pos > 0 && best_v[pos - 1] < v) {
    best_v[pos] = best_v[pos - 1];
    best_i[pos] = best_i[pos - 1];
    --pos;
  }
  best_v[pos] = v;
  best_i[pos] = i;
}

void topk_row(const float* row, int64_t n, int64_t k, float* best_v, int64_t* best_i) {
  int64_t filled = 0;
  // Strictly greater than the k-th best enters: an equal value at a later column loses the tie.
  auto consider = [&](int64_t j) {
    const float v = row[j];
    if (filled < k || v > best_v[k - 1]) insert(best_v, best_i, filled, k, v, j);
  };
  int64_t j = 0;
  for (; j < std::min(n, k); ++j) consider(j);
  for (; j + kChunk <= n; j += kChunk) {
    float chunk_max = row[j];
    for (int64_t c = 1; c < kChunk; ++c) chunk_max = std::max(chunk_max, row[j + c]);
    if (chunk_max > best_v[k - 1])
      for (int64_t c = 0; c < kChunk; ++c) consider(j + c);
  }
  for (; j < n; ++j) consider(j);
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> row_topk(const torch::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "row_topk: x must be a 2-D float32 tensor");
  TORCH_CHECK(k >= 1 && k <= x.size(1), "row_topk: need 1 <= k <= columns");
  const auto rows = x.contiguous();
  const int64_t n = rows.size(1);
  auto values = torch::empty({rows.size(0), k}, rows.options());
  auto indices = torch::empty({rows.size(0), k}, rows.options().dtype(at::kLong));
  const float* src = rows.data_ptr<float>();
  float* out_v = values.data_ptr<float>();
  int64_t* out_i = indices.data_ptr<int64_t>();
  at::parallel_for(0, rows.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) topk_row(src + r * n, n, k, out_v + r * k, out_i + r * k);
  });
  return {values, indices};
}
