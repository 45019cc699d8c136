// Paged attention of a ragged batch on the CPU, batch-invariant by construction.
//
// Each (query row, head) is computed alone: its scores over exactly the keys it may see, in key
// order, with fp32 accumulators in a fixed pattern. Nothing depends on which other rows share the
// call, how many query tokens its sequence brings, or how long the other sequences are, so a
// token's output is bit-identical whether it is decoded alone, verified behind drafts, or batched.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int kLanes = 16;  // fixed accumulator pattern of the dot products

template <typename T>
inline float dot(const float* q, const T* k, int64_t dim) {
  float lanes[kLanes] = {0};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    for (int i = 0; i < kLanes; ++i) lanes[i] += q[d + i] * static_cast<float>(k[d + i]);
  }
  for (; d < dim; ++d) lanes[d % kLanes] += q[d] * static_cast<float>(k[d]);
  // Pairwise, always the same tree.
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  }
  return lanes[0];
}

template <typename T>
void attend(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
            const torch::Tensor& block_tables, const torch::Tensor& query_start_loc,
            const torch::Tensor& seq_lens, double scale, int64_t window, double softcap,
            torch::Tensor& out) {
  const int64_t num_tokens = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t num_seqs = seq_lens.size(0), table_width = block_tables.size(1);
  const T* q_ptr = q.data_ptr<T>();
  const T* k_ptr = k_cache.data_ptr<T>();
  const T* v_ptr = v_cache.data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t slot_stride = num_kv_heads * head_dim;

  // Which sequence each query token belongs to.
  std::vector<int32_t> seq_of(num_tokens);
  for (int64_t b = 0; b < num_seqs; ++b) {
    for (int32_t t = starts[b]; t < starts[b + 1]; ++t) seq_of[t] = static_cast<int32_t>(b);
  }
  // One work item per (token, KV head): the query heads of its group read each key and value row
  // once, and each head still accumulates over the keys in order.
  at::parallel_for(0, num_tokens * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, query(group * head_dim), acc(group * head_dim), max_score(group), total(group);
    std::vector<int64_t> slots;
    for (int64_t work = begin; work < end; ++work) {
      const int64_t t = work / num_kv_heads, kvh = work % num_kv_heads;
      const int64_t b = seq_of[t];
      const int64_t q_len = starts[b + 1] - starts[b];
      const int64_t pos = lens[b] - q_len + (t - starts[b]);  // this token's position
      const int64_t first = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      const int64_t num_keys = pos - first + 1;
      const int32_t* table = tables + b * table_width;
      slots.resize(num_keys);
      for (int64_t j = first; j <= pos; ++j) {
        slots[j - first] = static_cast<int64_t>(table[j / block_size]) * block_size + j % block_size;
      }
      for (int64_t g = 0; g < group; ++g) {
        const T* q_row = q_ptr + (t * num_heads + kvh * group + g) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) query[g * head_dim + d] = static_cast<float>(q_row[d]);
      }
      scores.resize(group * num_keys);
      std::fill(max_score.begin(), max_score.end(), -std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < num_keys; ++j) {
        const T* k_row = k_ptr + slots[j] * slot_stride + kvh * head_dim;
        for (int64_t g = 0; g < group; ++g) {
          float s = dot(query.data() + g * head_dim, k_row, head_dim) * static_cast<float>(scale);
          if (softcap > 0) s = static_cast<float>(softcap) * std::tanh(s / static_cast<float>(softcap));
          scores[g * num_keys + j] = s;
          max_score[g] = std::max(max_score[g], s);
        }
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(total.begin(), total.end(), 0.0f);
      for (int64_t j = 0; j < num_keys; ++j) {
        const T* v_row = v_ptr + slots[j] * slot_stride + kvh * head_dim;
        for (int64_t g = 0; g < group; ++g) {
          const float p = std::exp(scores[g * num_keys + j] - max_score[g]);
          total[g] += p;
          float* a = acc.data() + g * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p * static_cast<float>(v_row[d]);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        T* out_row = out_ptr + (t * num_heads + kvh * group + g) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) out_row[d] = static_cast<T>(acc[g * head_dim + d] / total[g]);
      }
    }
  });
}

}  // namespace

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor query_start_loc,
                              torch::Tensor seq_lens, double scale, int64_t window, double softcap) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and the KV cache must share a dtype");
  q = q.contiguous();
  auto tables = block_tables.to(torch::kInt32).contiguous();
  auto starts = query_start_loc.to(torch::kInt32).contiguous();
  auto lens = seq_lens.to(torch::kInt32).contiguous();
  auto out = torch::empty_like(q);
  switch (q.scalar_type()) {
    case torch::kFloat:
      attend<float>(q, k_cache, v_cache, tables, starts, lens, scale, window, softcap, out);
      break;
    case torch::kBFloat16:
      attend<at::BFloat16>(q, k_cache, v_cache, tables, starts, lens, scale, window, softcap, out);
      break;
    case torch::kHalf:
      attend<at::Half>(q, k_cache, v_cache, tables, starts, lens, scale, window, softcap, out);
      break;
    default:
      TORCH_CHECK(false, "unsupported dtype ", q.scalar_type());
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "batch-invariant paged attention (CPU)");
}
