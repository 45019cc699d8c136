// bf16 linear layers on CPUs with AVX-512 BF16 (vdpbf16ps), batch-invariant by construction.
//
// Why our own: at the 1-16 rows of a decode or verify step a bf16 linear layer is a stream over
// its weights, and oneDNN's small-M path pulls them at ~8 GB/s on the 2-core dev CPU (no AMX)
// where a plain sum reads ~24 GB/s. Here the weights are packed once, so that one 64-byte load
// holds 16 output columns x 2 inputs, and each (row, column) output is one fp32 lane that
// accumulates `vdpbf16ps` over the input pairs in order. That sequence of operations is the same
// whatever the number of rows, the tile a row falls in, or the thread that runs it, so a token's
// result never depends on the batch (the lossless guarantee needs this in every dtype).
//
// Where the CPU has AMX, the same packed weights feed AMX tiles instead: the packed layout is the
// tiles' VNNI layout (16 input pairs x 16 columns = one 1 KB B tile). Each (row, column) output is
// one fp32 tile element accumulating `tdpbf16ps` over the input pairs in order, 16 pairs per
// instruction, for every row count, tile position and thread: batch-invariant by construction too.
// A tile computes 16 rows for the price of one (its cost is the weight stream), so a verify step of
// 8 tokens costs little more than a decode step: on a 2-core AMX Xeon the model's 121 linear layers
// took ~12 ms at 1 and at 8 rows, and `specray bench engine` with tiles against without (two runs)
// had hybrid drafting at 75 against 60 tokens/s. The two instructions round differently, so a process uses one
// of them for every row count of a layer (AMX wherever K is a multiple of 32 and the OS grants the
// tiles), never both.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <array>
#include <cstring>
#include <utility>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

namespace {

constexpr int64_t kLanes = 16;    // output columns per vector
constexpr int kTileCols = 4;      // column blocks (of 16) per tile
constexpr int kTileRows = 4;      // rows per tile: 16 accumulators, 8 loads per 16 dot products

// Column block `col` of `rows` output rows: each row's fp32 sums `sum(r)` (+ bias) rounded to bf16,
// the columns past N masked off.
template <typename Sum>
inline void store_block(Sum sum, int64_t rows, const float* bias, uint16_t* out, int64_t out_stride, int64_t col,
                        int64_t n) {
  const int64_t valid = std::min<int64_t>(kLanes, n - col);
  const __mmask16 mask = valid >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + col) : _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_add_ps(sum(r), b));
    _mm256_mask_storeu_epi16(out + r * out_stride + col, mask, (__m256i)v);
  }
}

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
  for (int c = 0; c < C; ++c)
    store_block([&](int64_t r) { return acc[r][c]; }, R, bias, out, out_stride, col0 + c * kLanes, n);
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

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
constexpr int64_t kAmxRows = 16;   // rows per tile
constexpr int64_t kAmxPairs = 16;  // input pairs per tile step (64 bytes of a row)

// Whether this process may use AMX tiles: Linux hands them out on request (arch_prctl).
bool amx_granted() {
  static const bool granted = [] {
    constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: C accumulators of `rows` rows x 16 fp32 columns; 4: A (`rows` rows x 16 pairs); 5, 6:
// B (16 pairs x 16 columns x 2), alternating so a load need not wait for the last product.
void load_amx_config(int64_t rows) {
  TileConfig cfg;
  for (int t = 0; t < 5; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(rows);
    cfg.colsb[t] = 64;
  }
  for (int t = 5; t < 7; ++t) {
    cfg.rows[t] = kAmxPairs;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// C column blocks of one group of up to 16 rows (the configured count): acc[c] = x . w[block c]
// over all pairs, then the fp32 sums (+ bias) rounded to bf16.
template <int C>
void amx_tile(const uint16_t* x, int64_t x_stride, const uint16_t* w, int64_t block_stride, int64_t pairs,
              const float* bias, uint16_t* out, int64_t out_stride, int64_t rows, int64_t col0, int64_t n,
              float* scratch) {
  _tile_zero(0);
  if (C > 1) _tile_zero(1);
  if (C > 2) _tile_zero(2);
  if (C > 3) _tile_zero(3);
  for (int64_t p = 0; p < pairs; p += kAmxPairs) {
    const uint16_t* wp = w + p * 2 * kLanes;
    _tile_loadd(4, x + 2 * p, x_stride * 2);
    _tile_loadd(5, wp, 64);
    if (C > 1) _tile_loadd(6, wp + block_stride, 64);
    _tile_dpbf16ps(0, 4, 5);
    if (C > 1) _tile_dpbf16ps(1, 4, 6);
    if (C > 2) {
      _tile_loadd(5, wp + 2 * block_stride, 64);
      _tile_dpbf16ps(2, 4, 5);
    }
    if (C > 3) {
      _tile_loadd(6, wp + 3 * block_stride, 64);
      _tile_dpbf16ps(3, 4, 6);
    }
  }
  _tile_stored(0, scratch, 64);
  if (C > 1) _tile_stored(1, scratch + kAmxRows * kLanes, 64);
  if (C > 2) _tile_stored(2, scratch + 2 * kAmxRows * kLanes, 64);
  if (C > 3) _tile_stored(3, scratch + 3 * kAmxRows * kLanes, 64);
  for (int c = 0; c < C; ++c)
    store_block([&](int64_t r) { return _mm512_loadu_ps(scratch + (c * kAmxRows + r) * kLanes); }, rows, bias, out,
                out_stride, col0 + c * kLanes, n);
}

using AmxTileFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, const float*, uint16_t*,
                           int64_t, int64_t, int64_t, int64_t, float*);
const std::array<AmxTileFn, kTileCols> kAmxTiles = {&amx_tile<1>, &amx_tile<2>, &amx_tile<3>, &amx_tile<4>};

bool uses_amx(int64_t pairs) { return pairs % kAmxPairs == 0 && amx_granted(); }

// out[m, n] = x . w + bias through AMX tiles, rows in groups of 16 (the last one shorter).
void linear_amx(const torch::Tensor& rows, const uint16_t* w_ptr, int64_t pairs, int64_t blocks,
                const float* bias_ptr, torch::Tensor& out) {
  const int64_t m = rows.size(0), n = out.size(1), x_stride = rows.stride(0);
  const uint16_t* x_ptr = reinterpret_cast<const uint16_t*>(rows.data_ptr<at::BFloat16>());
  uint16_t* out_ptr = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t block_stride = pairs * 2 * kLanes, groups = (blocks + kTileCols - 1) / kTileCols;
  // Threads split the columns; every thread runs all rows of its columns (weights read once).
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float scratch[kTileCols * kAmxRows * kLanes];
    // Loaded on every call: other code on this thread (oneDNN) may have released the tiles.
    int64_t configured = 0;
    for (int64_t g = begin; g < end; ++g) {
      const int64_t block0 = g * kTileCols, cols = std::min<int64_t>(kTileCols, blocks - block0);
      for (int64_t r0 = 0; r0 < m; r0 += kAmxRows) {
        const int64_t r = std::min<int64_t>(kAmxRows, m - r0);
        if (r != configured) {
          load_amx_config(r);
          configured = r;
        }
        kAmxTiles[cols - 1](x_ptr + r0 * x_stride, x_stride, w_ptr + block0 * block_stride, block_stride, pairs,
                            bias_ptr, out_ptr + r0 * n, n, r, block0 * kLanes, n, scratch);
      }
    }
  });
}
#else
bool uses_amx(int64_t) { return false; }
void linear_amx(const torch::Tensor&, const uint16_t*, int64_t, int64_t, const float*, torch::Tensor&) {}
#endif

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
  const uint16_t* w_ptr = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  if (uses_amx(pairs)) {
    linear_amx(rows, w_ptr, pairs, blocks, bias_ptr, out);
    return out;
  }
  const uint16_t* x_ptr = reinterpret_cast<const uint16_t*>(rows.data_ptr<at::BFloat16>());
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
