// Row-wise ops of a decoder layer on the CPU, each one call instead of the small PyTorch ops (and
// their dtype round trips) it replaces: RMSNorm, rotate-half RoPE and the MLP's gated activation.
// At one token per step those small ops cost more in dispatch than in arithmetic.
//
// Batch-invariant by construction: every row is computed by the same fixed sequence of operations,
// whatever the number of rows, and rows are only split between threads, never within one.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

namespace {

template <typename T>
inline float widen(T x) {
  return static_cast<float>(x);
}

// x [rows, n] with unit stride along n (rows may be strided); out [rows, n] contiguous.
// Llama: out = w · cast(x · rsqrt(mean(x²) + eps)) (cast first, product in x's dtype).
// Gemma (adds_one): out = cast(x · rsqrt(mean(x²) + eps) · (1 + w)) (all in fp32, cast last).
template <typename T>
void rms_norm_rows(const torch::Tensor& x, const torch::Tensor& weight, torch::Tensor& out, double eps,
                   bool adds_one) {
  const int64_t rows = x.size(0), n = x.size(1), row_stride = x.stride(0);
  const T* src = x.data_ptr<T>();
  const T* w = weight.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = src + r * row_stride;
      // 16 partial sums, combined by a fixed tree: the same order for every row and batch.
      float partial[16] = {0.0f};
      for (int64_t i = 0; i < n; ++i) {
        const float v = widen(row[i]);
        partial[i & 15] += v * v;
      }
      for (int width = 8; width >= 1; width /= 2) {
        for (int i = 0; i < width; ++i) partial[i] += partial[i + width];
      }
      const float inv = 1.0f / std::sqrt(partial[0] / static_cast<float>(n) + static_cast<float>(eps));
      T* o = dst + r * n;
      for (int64_t i = 0; i < n; ++i) {
        const float normed = widen(row[i]) * inv;
        if (adds_one) {
          o[i] = static_cast<T>(normed * (1.0f + widen(w[i])));
        } else {
          o[i] = static_cast<T>(widen(w[i]) * widen(static_cast<T>(normed)));
        }
      }
    }
  });
}

// x [tokens, heads, d] with unit stride along d, rotated in place by cos/sin [tokens, d]
// (rotate-half: x' = x·cos + [−x₂, x₁]·sin), in fp32 and cast once.
template <typename T>
void rotary_rows(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t tokens = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2;
  const int64_t token_stride = x.stride(0), head_stride = x.stride(1);
  T* base = x.data_ptr<T>();
  const T* c = cos.data_ptr<T>();
  const T* s = sin.data_ptr<T>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* ct = c + t * d;
      const T* st = s + t * d;
      for (int64_t h = 0; h < heads; ++h) {
        T* v = base + t * token_stride + h * head_stride;
        for (int64_t i = 0; i < half; ++i) {
          const float a = widen(v[i]), b = widen(v[i + half]);
          v[i] = static_cast<T>(a * widen(ct[i]) - b * widen(st[i]));
          v[i + half] = static_cast<T>(b * widen(ct[i + half]) + a * widen(st[i + half]));
        }
      }
    }
  });
}

// act(x) for 16 lanes with our exp (vectorized; std::exp per element cost more than the GEMMs
// around it at 8 rows). Both from e = exp(-|x|) <= 1:
// silu(x) = x / (1 + exp(-x)) = x / (1 + e) for x >= 0, x * e / (1 + e) below;
// gelu-tanh(x) = x/2 * (1 + tanh(u)), u = 0.79788456 (x + 0.044715 x^3),
// tanh(u) = sign(u) (1 - e) / (1 + e) with e = exp(-2|u|).
inline specray_vec::vec activation(specray_vec::vec x, bool gelu) {
  using namespace specray_vec;
  if (gelu) {
    const vec u = 0.7978845608f * (x + 0.044715f * x * x * x);
    const vec e = exp_nonpositive(-2.0f * (u < 0.0f ? -u : u));
    const vec t = (1.0f - e) / (1.0f + e);
    return 0.5f * x * (1.0f + (u < 0.0f ? -t : t));
  }
  const vec e = exp_nonpositive(x < 0.0f ? x : -x);
  return (x < 0.0f ? x * e : x) / (1.0f + e);
}

// 16 bf16 values (as bits) widened to fp32: exact, a shift.
inline specray_vec::vec widen_bf16(const at::BFloat16* p) {
  using half_lanes = uint16_t __attribute__((vector_size(specray_vec::kLanes * sizeof(uint16_t))));
  half_lanes raw;
  std::memcpy(&raw, p, sizeof(raw));
  const specray_vec::ivec bits = __builtin_convertvector(raw, specray_vec::ivec) << 16;
  return reinterpret_cast<const specray_vec::vec&>(bits);
}

// 16 fp32 lanes rounded to bf16 to nearest even, as c10::BFloat16 rounds a (non-NaN) float.
inline void narrow_bf16(specray_vec::vec v, at::BFloat16* p) {
  using namespace specray_vec;
  using uvec = uint32_t __attribute__((vector_size(kLanes * sizeof(uint32_t))));
  using half_lanes = uint16_t __attribute__((vector_size(kLanes * sizeof(uint16_t))));
  const uvec bits = reinterpret_cast<const uvec&>(v);
  const uvec rounded = (bits + (0x7FFFu + ((bits >> 16) & 1u))) >> 16;
  const half_lanes out = __builtin_convertvector(rounded, half_lanes);
  std::memcpy(p, &out, sizeof(out));
}

// x [rows, 2i] = [gate | up] (unit stride along a row) -> act(gate) * up [rows, i], each product
// in fp32 from the activation rounded to x's dtype, as PyTorch's act(gate) * up computes it.
template <typename T>
void gated_rows(const torch::Tensor& x, torch::Tensor& out, bool gelu) {
  using namespace specray_vec;
  const int64_t rows = x.size(0), width = out.size(1), row_stride = x.stride(0);
  const T* src = x.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    alignas(64) float lanes[kLanes];
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = src + r * row_stride;
      const T* up = gate + width;
      T* o = dst + r * width;
      int64_t i0 = 0;
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        // Whole vectors of bf16 without per-element conversions, rounding as the loop below does.
        alignas(64) at::BFloat16 act[kLanes];
        for (; i0 + kLanes <= width; i0 += kLanes) {
          narrow_bf16(activation(widen_bf16(gate + i0), gelu), act);
          narrow_bf16(widen_bf16(act) * widen_bf16(up + i0), o + i0);
        }
      }
      for (; i0 < width; i0 += kLanes) {
        const int64_t n = std::min<int64_t>(kLanes, width - i0);
        for (int64_t i = 0; i < kLanes; ++i) lanes[i] = i < n ? widen(gate[i0 + i]) : 0.0f;
        store(lanes, activation(load(lanes), gelu));
        for (int64_t i = 0; i < n; ++i) o[i0 + i] = static_cast<T>(widen(static_cast<T>(lanes[i])) * widen(up[i0 + i]));
      }
    }
  });
}

}  // namespace

torch::Tensor gated_activation(const torch::Tensor& x, bool gelu) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0,
              "gated_activation: x must be [rows, 2i] with unit stride along a row");
  auto out = torch::empty({x.size(0), x.size(1) / 2}, x.options());
  switch (x.scalar_type()) {
    case at::kFloat: gated_rows<float>(x, out, gelu); break;
    case at::kBFloat16: gated_rows<at::BFloat16>(x, out, gelu); break;
    case at::kHalf: gated_rows<at::Half>(x, out, gelu); break;
    default: TORCH_CHECK(false, "gated_activation: unsupported dtype ", x.scalar_type());
  }
  return out;
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps, bool adds_one) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rms_norm: x must be [rows, n] with unit stride along n");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "rms_norm: weight must be a contiguous [n] of x's dtype");
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  switch (x.scalar_type()) {
    case at::kFloat: rms_norm_rows<float>(x, weight, out, eps, adds_one); break;
    case at::kBFloat16: rms_norm_rows<at::BFloat16>(x, weight, out, eps, adds_one); break;
    case at::kHalf: rms_norm_rows<at::Half>(x, weight, out, eps, adds_one); break;
    default: TORCH_CHECK(false, "rms_norm: unsupported dtype ", x.scalar_type());
  }
  return out;
}

void rotary_(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0,
              "rotary_: x must be [tokens, heads, d] with unit stride along an even d");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == x.size(0) &&
                  cos.size(1) == x.size(2) && sin.sizes() == cos.sizes() &&
                  cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "rotary_: cos and sin must be contiguous [tokens, d] of x's dtype");
  switch (x.scalar_type()) {
    case at::kFloat: rotary_rows<float>(x, cos, sin); break;
    case at::kBFloat16: rotary_rows<at::BFloat16>(x, cos, sin); break;
    case at::kHalf: rotary_rows<at::Half>(x, cos, sin); break;
    default: TORCH_CHECK(false, "rotary_: unsupported dtype ", x.scalar_type());
  }
}
