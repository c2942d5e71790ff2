// The prologue of a fused zigzag GEMV (kernels/contract.h's Prologue): what the kernels read as x.
// x' is computed in float32 and rounded to T as the CPU and CUDA kernels do (RMSNorm: before and after
// the weight, as MLX's rms_norm), so every backend decides the active set on the values the unfused
// ops give, up to the last bit (each backend reduces the norm in its own order, with its own rsqrt).
#pragma once

#include "params.h"
#include "utils.h"

using namespace metal;

namespace spqt::metal_prologue {

constant constexpr int kIdentity = 0;
constant constexpr int kRmsNorm = 1;
constant constexpr int kSwiGLU = 2;

// The row of x a threadgroup reads: K columns, or 2K (gate, then up) for SwiGLU.
template <typename T>
inline const device T* row(const device T* x, int m, int K, int prologue) {
  return x + int64_t(m) * (prologue == kSwiGLU ? 2 * K : K);
}

// 1 / sqrt(mean(xm^2) + eps) over the K columns of a row, reduced by the whole threadgroup (every
// thread gets it). `scratch` holds one float per simdgroup. Starts and ends with a barrier.
template <typename T>
inline float inv_rms(const device T* xm, int K, float eps, SPQT_THREADGROUP_PARAM float* scratch, uint tid,
                     uint threads, uint sg, uint simdgroups, uint lane) {
  float squares = 0.0f;
  for (int k = int(tid); k < K; k += int(threads)) {
    const float v = float(xm[k]);
    squares += v * v;
  }
  squares = simd_sum(squares);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (lane == 0) {
    scratch[sg] = squares;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float total = 0.0f;
  for (uint s = 0; s < simdgroups; ++s) {
    total += scratch[s];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return metal::precise::rsqrt(total / float(K) + eps);  // as MLX's rms_norm
}

// Column k of x'.
template <typename T>
inline float input(const device T* xm, const device T* norm, float inv_rms, int prologue, int K, int k) {
  const float v = float(xm[k]);
  if (prologue == kIdentity) {
    return v;
  }
  const float r = prologue == kRmsNorm ? float(T(v * inv_rms)) * float(norm[k])
                                       : v / (1.0f + metal::exp(-v)) * float(xm[K + k]);
  return float(T(r));
}

} // namespace spqt::metal_prologue
