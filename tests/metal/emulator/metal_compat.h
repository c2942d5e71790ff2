// Metal compatibility layer: lets the .metal kernel sources compile as C++20 and run on the SIMT
// emulator (simt.h). Reached through include/metal_stdlib, so kernels keep `#include <metal_stdlib>`.
//
// Address spaces become plain C++ (`threadgroup` arrays become per-threadgroup statics), Metal attributes such as [[buffer(0)]] are ignored by the compiler (-Wno-attributes),
// and the metal:: functions the kernels use are implemented on top of the emulator.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <typeindex>

#include "simt.h"

namespace metal {

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

inline void threadgroup_barrier(mem_flags) {
  simt::threadgroup_barrier();
}

template <typename T>
T simd_sum(T v) {
  return simt::simd_collective("simd_sum", v, [](int, const bool* present, auto value) {
    T s = T(0);
    for (int l = 0; l < simt::kSimdSize; ++l) {
      if (present[l]) {
        s += value(l);
      }
    }
    return s;
  });
}

template <typename T>
T simd_prefix_exclusive_sum(T v) {
  return simt::simd_collective("simd_prefix_exclusive_sum", v, [](int lane, const bool* present, auto value) {
    T s = T(0);
    for (int l = 0; l < lane; ++l) {
      if (present[l]) {
        s += value(l);
      }
    }
    return s;
  });
}

// Lanes whose source lane is past the simdgroup (or inactive) keep their own value.
template <typename T>
T simd_shuffle_down(T v, ushort delta) {
  return simt::simd_collective("simd_shuffle_down", v, [delta](int lane, const bool* present, auto value) {
    const int src = lane + int(delta);
    return src < simt::kSimdSize && present[src] ? value(src) : value(lane);
  });
}

template <typename T>
T simd_shuffle(T v, ushort src) {
  return simt::simd_collective("simd_shuffle", v, [src](int lane, const bool* present, auto value) {
    if (src >= simt::kSimdSize || !present[src]) {
      simt::fail("simd_shuffle reads an inactive lane");
    }
    return value(int(src));
  });
}

template <typename T>
T min(T a, T b) {
  return a < b ? a : b;
}

template <typename T>
T max(T a, T b) {
  return a < b ? b : a;
}

template <typename T>
T clamp(T v, T lo, T hi) {
  return min(max(v, lo), hi);
}

inline float abs(float v) {
  return std::fabs(v);
}

inline float exp(float v) {
  return std::exp(v);
}

inline float sqrt(float v) {
  return std::sqrt(v);
}

namespace precise {
// Metal's correctly rounded reciprocal square root.
inline float rsqrt(float v) {
  return float(1.0 / std::sqrt(double(v)));
}
} // namespace precise

inline float fabs(float v) {
  return std::fabs(v);
}

} // namespace metal

// Address spaces. Kernel-scope `threadgroup` arrays become thread_local statics: every fiber of a
// threadgroup runs on that threadgroup's OS thread and so shares one copy, which the emulator
// poisons before the threadgroup starts (simt.cpp).
#define device
#define constant
#define thread
#define threadgroup static thread_local
#define SPQT_THREADGROUP_PARAM  // a helper's pointer to threadgroup memory (kernels/metal/utils.h)

// Registers the host name instead of emitting a Metal entry point (see kernels/metal/utils.h).
#define SPQT_EMU_CAT_(a, b) a##b
#define SPQT_EMU_CAT(a, b) SPQT_EMU_CAT_(a, b)
#define instantiate_kernel(name, func, ...)                                        \
  [[maybe_unused]] static const bool SPQT_EMU_CAT(spqt_kernel_, __COUNTER__) =    \
      ::simt::register_kernel(                                                      \
          name, reinterpret_cast<void*>(&func<__VA_ARGS__>), typeid(&func<__VA_ARGS__>));
