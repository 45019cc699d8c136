// 16-lane fp32 vectors (GCC/Clang vector extensions) and the ops the CPU kernels share.
#pragma once

#include <cstdint>
#include <cstring>

namespace specray_vec {

constexpr int kLanes = 16;

using vec = float __attribute__((vector_size(kLanes * sizeof(float))));
using ivec = int32_t __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vec splat(float x) { return vec{} + x; }

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof(v)); }

// exp(x) for x <= 0, lane-wise: exp(x) = 2^n * exp(r), r = x - n ln2 in [-ln2/2, ln2/2], exp(r) by
// its degree-6 Taylor polynomial (relative error < 2e-7). Our own so every build computes the
// same bits on every lane, whatever the libm.
inline vec exp_nonpositive(vec x) {
  x = x < -87.0f ? splat(-87.0f) : x;  // exp(-87) ~ 1.6e-38: still a normal float, never -inf
  const vec shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vec n = (x * 1.44269504f + shifter) - shifter;
  const vec r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  vec p = splat(1.0f / 720);
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  return p * reinterpret_cast<const vec&>(bits);
}

}  // namespace specray_vec
