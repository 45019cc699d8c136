// bf16 linear layers on CPUs with AVX-512 BF16 (vdpbf16ps), batch-invariant by construction.
//
// Why our own: at the 1-16 rows of a decode or verify step a bf16 linear layer is a stream over
// its weights, and oneDNN's small-M path pulls them at ~8 GB/s on the 2-core dev CPU (no AMX)
// where a plain sum reads ~24 GB/s. Here the weights are packed once, so that one 64-byte load
// holds 16 output columns x 2 inputs, and each (row, column) output is one fp32 lane that
// accumulates `vdpbf16ps` over the input pairs in order. That sequence of operations is the same
// whatever the number of rows, the tile a row falls in, or the thread that runs it, so a token's
// result never depends on the batch (the lossless guarantee needs this in every dtype).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <array>
#include <cstring>
#include <utility>

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

namespace {

constexpr int64_t kLanes = 16;    // output columns per vector
constexpr int kTileCols = 4;      // column blocks (of 16) per tile
constexpr int kTileRows = 4;      // rows per tile: 16 accumulators, 8 loads per 16 dot products

// One tile: R rows x C column blocks, over all K/2 input pairs.
template <int R, int C>
void tile(const uint16_t* x, int64_t x_stride, const uint16_t* w, int64_t block_stride, int64_t pairs,
          const float* bias, uint16_t* out, int64_t out_stride, int64_t col0, int64_t n) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh wv[C];
    for (int c = 0; c < C; ++c) wv[c] = (__m512bh)_mm512_loadu_si512(w + c * block_stride + p * 2 * kLanes);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * x_stride + 2 * p, sizeof(pair));
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv[c]);
    }
  }
  for (int c = 0; c < C; ++c) {
    const int64_t col = col0 + c * kLanes;
    const int64_t valid = std::min<int64_t>(kLanes, n - col);
    const __mmask16 mask = valid >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + col) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_add_ps(acc[r][c], b));
      _mm256_mask_storeu_epi16(out + r * out_stride + col, mask, (__m256i)v);
    }
  }
}

using TileFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, const float*, uint16_t*,
                        int64_t, int64_t, int64_t);

template <int R, int... Cs>
constexpr std::array<TileFn, sizeof...(Cs)> row_tiles(std::integer_sequence<int, Cs...>) {
  return {&tile<R, Cs + 1>...};
}

const std::array<std::array<TileFn, kTileCols>, kTileRows> kTiles = {
    row_tiles<1>(std::make_integer_sequence<int, kTileCols>{}),
    row_tiles<2>(std::make_integer_sequence<int, kTileCols>{}),
    row_tiles<3>(std::make_integer_sequence<int, kTileCols>{}),
    row_tiles<4>(std::make_integer_sequence<int, kTileCols>{}),
};

}  // namespace

bool has_bf16_gemm() { return true; }

// w [N, K] bf16 (K even) -> [ceil(N/16), K/2, 16, 2]: block b, pair p holds columns 16b..16b+15,
// inputs 2p and 2p+1 (zeros past N).
torch::Tensor pack_bf16_weight(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kBFloat16, "weight must be [N, K] bf16");
  TORCH_CHECK(weight.size(1) % 2 == 0, "K must be even");
  const auto w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1), blocks = (n + kLanes - 1) / kLanes;
  auto packed = torch::zeros({blocks, k / 2, kLanes, 2}, w.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.data_ptr<at::BFloat16>());
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t j = 0; j < kLanes && b * kLanes + j < n; ++j)
        for (int64_t i = 0; i < k; ++i) dst[((b * (k / 2) + i / 2) * kLanes + j) * 2 + i % 2] = src[(b * kLanes + j) * k + i];
  });
  return packed;
}

// x [M, K] bf16 -> x @ w.T + bias, [M, N] bf16, with w packed by pack_bf16_weight.
torch::Tensor linear_bf16(const torch::Tensor& x, const torch::Tensor& packed, int64_t n,
                          const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "x must be [M, K] bf16");
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) * 2 == x.size(1), "packed weight does not match x");
  const auto rows = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t m = rows.size(0), pairs = packed.size(1), blocks = packed.size(0);
  TORCH_CHECK(blocks * kLanes >= n && n > (blocks - 1) * kLanes, "N does not match the packed weight");
  auto out = torch::empty({m, n}, x.options());
  torch::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(torch::kFloat).contiguous();
  const float* bias_ptr = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const uint16_t* x_ptr = reinterpret_cast<const uint16_t*>(rows.data_ptr<at::BFloat16>());
  const uint16_t* w_ptr = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  uint16_t* out_ptr = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t block_stride = pairs * 2 * kLanes, groups = (blocks + kTileCols - 1) / kTileCols;
  const int64_t x_stride = rows.stride(0);
  // Threads split the columns; every thread runs all rows of its columns (weights read once).
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t block0 = g * kTileCols, cols = std::min<int64_t>(kTileCols, blocks - block0);
      for (int64_t r0 = 0; r0 < m; r0 += kTileRows) {
        const int64_t r = std::min<int64_t>(kTileRows, m - r0);
        kTiles[r - 1][cols - 1](x_ptr + r0 * x_stride, x_stride, w_ptr + block0 * block_stride, block_stride, pairs,
                                bias_ptr, out_ptr + r0 * n, n, block0 * kLanes, n);
      }
    }
  });
  return out;
}

#else

bool has_bf16_gemm() { return false; }

torch::Tensor pack_bf16_weight(const torch::Tensor&) { TORCH_CHECK(false, "built without AVX-512 BF16"); }

torch::Tensor linear_bf16(const torch::Tensor&, const torch::Tensor&, int64_t, const c10::optional<torch::Tensor>&) {
  TORCH_CHECK(false, "built without AVX-512 BF16");
}

#endif
