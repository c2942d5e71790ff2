// The Metal scalar and vector types the kernels use, as plain C++ (no address-space macros here, so
// the harness can include it next to the standard library).
#pragma once

#include <cstdint>
#include <cstring>

using uint = unsigned int;
using ushort = unsigned short;
using half = _Float16;

// bfloat16 with round-to-nearest-even from float, as Metal's bfloat and MLX's CPU bfloat16_t.
struct bfloat {
  uint16_t bits;
  bfloat() = default;
  explicit bfloat(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = uint16_t((u >> 16) | 0x40u); // quiet NaN
    } else {
      bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

template <typename T, int N>
struct vec {
  T v[N];
  vec() = default;
  explicit vec(T s) {
    for (int i = 0; i < N; ++i) {
      v[i] = s;
    }
  }
  template <typename... A>
    requires(sizeof...(A) == N && N > 1)
  vec(A... a) : v{T(a)...} {}
  T& operator[](int i) {
    return v[i];
  }
  const T& operator[](int i) const {
    return v[i];
  }
  vec& operator+=(const vec& o) {
    for (int i = 0; i < N; ++i) {
      v[i] += o.v[i];
    }
    return *this;
  }
  friend vec operator+(vec a, const vec& b) {
    return a += b;
  }
  friend vec operator*(T s, vec a) {
    for (int i = 0; i < N; ++i) {
      a.v[i] *= s;
    }
    return a;
  }
  friend vec operator*(vec a, T s) {
    return s * a;
  }
};

using float2 = vec<float, 2>;
using float4 = vec<float, 4>;

struct uint3 {
  uint x = 0, y = 0, z = 0;
};
