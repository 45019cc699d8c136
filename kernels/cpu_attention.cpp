// Paged attention of a ragged batch on the CPU, batch-invariant by construction.
//
// A work item is one sequence, one KV head and a block of up to kRowBlock of its query rows: the
// rows and the group's query heads share each pass over the keys (each key and value row is read
// once per block; values are widened to fp32, and so are keys except in bf16 on CPUs with AVX-512
// BF16, where q·k runs as vdpbf16ps on the stored rows). Keys go in tiles of kTile aligned to
// absolute positions, and every (row, head) runs an online softmax over the tiles that hold its
// keys, with one fixed sequence of operations per key: a dot product reduced by a fixed tree, a
// vector exp, and accumulation in key order (the tile's max and sum by fixed trees too). Which
// tiles a row visits and what it does in each depend only on its own position (and window), never
// on the other rows of its block, how many query tokens its sequence brings, or the other sequences. So a token's output is bit-identical whether it is
// decoded alone, verified behind drafts, prefilled in a chunk, or batched. Non-causal (a drafter's
// block, whose slots see each other both ways), every row sees all of its sequence's keys.
#include <torch/extension.h>

#include "cpu_ops.h"
#include "cpu_vec.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

using namespace specray_vec;

constexpr int kTile = kLanes;      // keys per tile = lanes of one vector
constexpr int kRowBlock = 16;  // query rows of one sequence sharing a pass over the keys

constexpr vec kLaneIndex = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// Max and sum of the 16 lanes, each by one fixed tree (the same order for every row and batch).
inline float lane_max(vec v) {
  v = v > __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7) ? v
      : __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v = v > __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3) ? v
      : __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
  v = v > __builtin_shufflevector(v, v, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1) ? v
      : __builtin_shufflevector(v, v, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
  return std::max(v[0], v[1]);
}

inline float lane_sum(vec v) {
  v = v + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
  v = v + __builtin_shufflevector(v, v, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
  return v[0] + v[1];
}

// One step of a transposed reduction: a and b each hold `16 / h` keys' h partial sums (key-major);
// the result holds all 2 * 16 / h keys (a's, then b's) with h / 2 partial sums each.
template <int h>
inline vec fold(vec a, vec b);
template <>
inline vec fold<16>(vec a, vec b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
template <>
inline vec fold<8>(vec a, vec b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
         __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}
template <>
inline vec fold<4>(vec a, vec b) {
  return __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
         __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
}
template <>
inline vec fold<2>(vec a, vec b) {
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// Lane j of the result is the sum of the 16 lanes of partial[j], always by the same tree; the 16
// sums share the shuffles.
inline vec reduce_tile(const vec* partial) {
  vec by8[8], by4[4], by2[2];
  for (int i = 0; i < 8; ++i) by8[i] = fold<16>(partial[2 * i], partial[2 * i + 1]);
  for (int i = 0; i < 4; ++i) by4[i] = fold<8>(by8[2 * i], by8[2 * i + 1]);
  for (int i = 0; i < 2; ++i) by2[i] = fold<4>(by4[2 * i], by4[2 * i + 1]);
  return fold<2>(by2[0], by2[1]);
}

// Copies n elements to fp32 and zero-fills up to `padded`. bf16 widens 16 lanes at a time by a
// shift (exact), the other types element by element.
template <typename T>
inline void widen(const T* src, float* dst, int64_t n, int64_t padded) {
  int64_t d = 0;
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    using half_lanes = uint16_t __attribute__((vector_size(kTile * sizeof(uint16_t))));
    using wide_lanes = uint32_t __attribute__((vector_size(kTile * sizeof(uint32_t))));
    for (; d + kTile <= n; d += kTile) {
      half_lanes raw;
      std::memcpy(&raw, src + d, sizeof(raw));
      const wide_lanes bits = __builtin_convertvector(raw, wide_lanes) << 16;
      std::memcpy(dst + d, &bits, sizeof(bits));
    }
  }
  for (; d < n; ++d) dst[d] = static_cast<float>(src[d]);
  for (; d < padded; ++d) dst[d] = 0.0f;
}

// Asks for the cache lines of a row of n elements.
template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(bytes + b);
}

#if defined(__AVX512BF16__)
constexpr bool kDotBf16 = true;
// Lane-wise partial sums of the dot product of two bf16 rows of n elements (n a multiple of 32):
// vdpbf16ps over 32-element chunks in order (products exact in fp32).
template <typename T>
inline vec dot_partial_bf16(const T* a, const T* b, int64_t n) {
  static_assert(std::is_same_v<T, at::BFloat16>, "bf16 rows only");
  __m512 acc = _mm512_setzero_ps();
  if (n == 64) {  // the common head size, unrolled (a loop here costs more than its two dot products)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a), (__m512bh)_mm512_loadu_si512(b));
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a + 32), (__m512bh)_mm512_loadu_si512(b + 32));
    n = 0;
  }
  for (int64_t i = 0; i < n; i += 32) {
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a + i), (__m512bh)_mm512_loadu_si512(b + i));
  }
  vec out;
  std::memcpy(&out, &acc, sizeof(out));
  return out;
}
#else
constexpr bool kDotBf16 = false;
template <typename T>
inline vec dot_partial_bf16(const T*, const T*, int64_t) { return vec{}; }
#endif

// acc[c] = acc[c] * rescale, then += weights[j] * values[j][c] for j in [from, to), key by key
// (each element in key order). Keys are the outer loop so that a row's C accumulators stay in
// registers and each weight is broadcast once (not once per chunk of the head).
template <int C>
inline void accumulate_values(float* acc, float rescale, const float* weights, const float* values,
                              int64_t stride, int64_t from, int64_t to) {
  vec sums[C];
  for (int c = 0; c < C; ++c) sums[c] = load(acc + c * kTile) * rescale;
  for (int64_t j = from; j < to; ++j) {
    const vec w = splat(weights[j]);
    for (int c = 0; c < C; ++c) sums[c] += w * load(values + j * stride + c * kTile);
  }
  for (int c = 0; c < C; ++c) store(acc + c * kTile, sums[c]);
}

// The same for any number of chunks (heads other than 64 or 128 wide), one chunk at a time.
inline void accumulate_values_any(float* acc, float rescale, const float* weights, const float* values,
                                  int64_t stride, int64_t chunks, int64_t from, int64_t to) {
  for (int64_t c = 0; c < chunks; ++c) {
    vec sum = load(acc + c * kTile) * rescale;
    for (int64_t j = from; j < to; ++j) sum += splat(weights[j]) * load(values + j * stride + c * kTile);
    store(acc + c * kTile, sum);
  }
}

// One (query row, head)'s running softmax: max, sum of weights, weighted sum of values.
struct RowState {
  float max_score;
  float total;
  float* acc;  // padded head_dim
};

template <typename T>
void attend(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
            const torch::Tensor& block_tables, const torch::Tensor& query_start_loc,
            const torch::Tensor& seq_lens, double scale, int64_t window, double softcap, bool causal,
            torch::Tensor& out) {
  const int64_t num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t num_seqs = seq_lens.size(0), table_width = block_tables.size(1);
  const int64_t padded_dim = (head_dim + kTile - 1) / kTile * kTile, chunks = padded_dim / kTile;
  const T* q_ptr = q.data_ptr<T>();
  const T* k_ptr = k_cache.data_ptr<T>();
  const T* v_ptr = v_cache.data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t slot_stride = num_kv_heads * head_dim;
  const float scale_f = static_cast<float>(scale), cap = static_cast<float>(softcap);
  const bool dot_bf16 = kDotBf16 && std::is_same_v<T, at::BFloat16> && head_dim % 32 == 0;

  // Work items: (sequence, KV head, block of the sequence's query rows).
  std::vector<int64_t> item_seq, item_row;
  for (int64_t b = 0; b < num_seqs; ++b) {
    for (int64_t t = starts[b]; t < starts[b + 1]; t += kRowBlock) {
      item_seq.push_back(b);
      item_row.push_back(t);
    }
  }
  const int64_t num_items = static_cast<int64_t>(item_seq.size()) * num_kv_heads;

  at::parallel_for(0, num_items, 1, [&](int64_t begin, int64_t end) {
    const int64_t states_per_item = kRowBlock * group;
    std::vector<float> queries(states_per_item * padded_dim), accs(states_per_item * padded_dim);
    std::vector<float> keys(kTile * padded_dim), values(kTile * padded_dim);
    std::vector<RowState> states(states_per_item);
    std::vector<int64_t> first_key(kRowBlock), last_key(kRowBlock);
    alignas(64) float scores[kTile];
    // bf16 keys enter the dot products as they are stored (no widening); absent keys read zeros.
    const std::vector<T> zero_row(head_dim);
    const T* key_rows[kTile];
    for (int64_t work = begin; work < end; ++work) {
      const int64_t item = work / num_kv_heads, kvh = work % num_kv_heads;
      const int64_t b = item_seq[item], row0 = item_row[item];
      const int64_t rows = std::min<int64_t>(kRowBlock, starts[b + 1] - row0);
      const int64_t q_len = starts[b + 1] - starts[b];
      const int32_t* table = tables + b * table_width;
      int64_t lo = std::numeric_limits<int64_t>::max(), hi = 0;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t pos = lens[b] - q_len + (row0 + r - starts[b]);  // this token's position
        first_key[r] = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
        last_key[r] = causal ? pos : lens[b] - 1;
        lo = std::min(lo, first_key[r]);
        hi = std::max(hi, last_key[r]);
        for (int64_t g = 0; g < group; ++g) {
          const int64_t s = r * group + g;
          widen(q_ptr + ((row0 + r) * num_heads + kvh * group + g) * head_dim,
                queries.data() + s * padded_dim, head_dim, padded_dim);
          states[s] = {-std::numeric_limits<float>::infinity(), 0.0f, accs.data() + s * padded_dim};
          std::fill(states[s].acc, states[s].acc + padded_dim, 0.0f);
        }
      }
      for (int64_t tile = lo / kTile * kTile; tile <= hi; tile += kTile) {
        const int64_t tile_keys = std::min<int64_t>(kTile, hi + 1 - tile);
        // The key's page and offset advance by one per key: no division per key.
        int64_t page = tile / block_size, offset = tile % block_size;
        if (tile + kTile <= hi) {
          // The next tile's rows, fetched while this one computes (a decode batch reads its KV
          // from memory, and the rows of a tile sit on one or two pages).
          int64_t next_page = (tile + kTile) / block_size, next_offset = (tile + kTile) % block_size;
          for (int64_t j = 0; j < kTile && tile + kTile + j <= hi; ++j) {
            const int64_t slot = static_cast<int64_t>(table[next_page]) * block_size + next_offset;
            prefetch_row(k_ptr + slot * slot_stride + kvh * head_dim, head_dim);
            prefetch_row(v_ptr + slot * slot_stride + kvh * head_dim, head_dim);
            if (++next_offset == block_size) {
              next_offset = 0;
              ++next_page;
            }
          }
        }
        if (dot_bf16) std::fill(key_rows, key_rows + kTile, zero_row.data());
        for (int64_t j = 0; j < tile_keys; ++j) {
          if (tile + j >= lo) {
            const int64_t slot = static_cast<int64_t>(table[page]) * block_size + offset;
            if (dot_bf16) {
              key_rows[j] = k_ptr + slot * slot_stride + kvh * head_dim;
            } else {
              widen(k_ptr + slot * slot_stride + kvh * head_dim, keys.data() + j * padded_dim, head_dim, padded_dim);
            }
            widen(v_ptr + slot * slot_stride + kvh * head_dim, values.data() + j * padded_dim, head_dim, padded_dim);
          }
          if (++offset == block_size) {
            offset = 0;
            ++page;
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          // The keys of this tile this row may see: [from, to).
          const int64_t from = std::max(first_key[r], tile) - tile;
          const int64_t to = std::min(last_key[r] + 1, tile + kTile) - tile;
          if (from >= to) continue;
          for (int64_t g = 0; g < group; ++g) {
            const int64_t s = r * group + g;
            const float* query = queries.data() + s * padded_dim;
            RowState& state = states[s];
            // Scores of the whole tile (keys it may not see included, then masked out).
            vec partial[kTile];
            if constexpr (std::is_same_v<T, at::BFloat16>) {
              if (dot_bf16) {
                const T* q_row = q_ptr + ((row0 + r) * num_heads + kvh * group + g) * head_dim;
                for (int64_t j = 0; j < kTile; ++j) partial[j] = dot_partial_bf16(q_row, key_rows[j], head_dim);
              }
            }
            if (!dot_bf16) {
              for (int64_t j = 0; j < kTile; ++j) {
                const float* k_row = keys.data() + j * padded_dim;
                partial[j] = load(query) * load(k_row);
                for (int64_t c = 1; c < chunks; ++c) partial[j] += load(query + c * kTile) * load(k_row + c * kTile);
              }
            }
            vec tile_scores = reduce_tile(partial) * scale_f;
            if (cap > 0) {
              store(scores, tile_scores);
              for (int64_t j = 0; j < kTile; ++j) scores[j] = cap * std::tanh(scores[j] / cap);
              tile_scores = load(scores);
            }
            const auto visible = (kLaneIndex >= static_cast<float>(from)) & (kLaneIndex < static_cast<float>(to));
            tile_scores = visible ? tile_scores : splat(-std::numeric_limits<float>::infinity());
            const float new_max = std::max(state.max_score, lane_max(tile_scores));
            // Rescale what the earlier tiles accumulated (exp(-inf) = 0 on the first tile).
            const float rescale =
                state.total == 0.0f ? 0.0f : exp_nonpositive(splat(state.max_score - new_max))[0];
            const vec weights = visible ? exp_nonpositive(tile_scores - new_max) : splat(0.0f);
            const float total = state.total * rescale + lane_sum(weights);
            store(scores, weights);
            if (chunks == 4) {
              accumulate_values<4>(state.acc, rescale, scores, values.data(), padded_dim, from, to);
            } else if (chunks == 8) {
              accumulate_values<8>(state.acc, rescale, scores, values.data(), padded_dim, from, to);
            } else {
              accumulate_values_any(state.acc, rescale, scores, values.data(), padded_dim, chunks, from, to);
            }
            state.total = total;
            state.max_score = new_max;
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t g = 0; g < group; ++g) {
          const RowState& state = states[r * group + g];
          T* out_row = out_ptr + ((row0 + r) * num_heads + kvh * group + g) * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) out_row[d] = static_cast<T>(state.acc[d] / state.total);
        }
      }
    }
  });
}

}  // namespace

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor query_start_loc,
                              torch::Tensor seq_lens, double scale, int64_t window, double softcap,
                              bool causal) {
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
      attend<float>(q, k_cache, v_cache, tables, starts, lens, scale, window, softcap, causal, out);
      break;
    case torch::kBFloat16:
      attend<at::BFloat16>(q, k_cache, v_cache, tables, starts, lens, scale, window, softcap, causal, out);
      break;
    case torch::kHalf:
      attend<at::Half>(q, k_cache, v_cache, tables, starts, lens, scale, window, softcap, causal, out);
      break;
    default:
      TORCH_CHECK(false, "unsupported dtype ", q.scalar_type());
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def(
      "paged_attention",
      [](torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
         torch::Tensor query_start_loc, torch::Tensor seq_lens, double scale, int64_t window, double softcap) {
        return paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, window,
                               softcap, true);
      },
      "batch-invariant causal paged attention (CPU)");
  m.def("rms_norm", &rms_norm, "RMSNorm of each row (CPU)");
  m.def("rotary_", &rotary_, "rotate-half RoPE in place (CPU)");
  m.def("gated_activation", &gated_activation, "act(gate) * up of a fused [gate | up] row (CPU)");
  m.def("row_topk", &row_topk, "the k largest values of each row and their columns, ties to the lower (CPU)");
  m.def("markov_candidates_block", &markov_candidates_block,
        "the Markov block sampler over each slot's candidate columns (CPU)");
  bind_decoder_layer(m);
  bind_draft_block(m);
  m.def("has_bf16_gemm", &has_bf16_gemm, "whether linear_bf16 is built (AVX-512 BF16)");
  m.def("pack_bf16_weight", &pack_bf16_weight, "pack a [N, K] bf16 weight for linear_bf16");
  m.def("linear_bf16", &linear_bf16, "batch-invariant bf16 linear layer (CPU, AVX-512 BF16)");
}
