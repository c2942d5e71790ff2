// Shared device helpers for the zigzag kernels: type conversion, code loads and unpacking.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../contract.h"

namespace spqt {

// The kinds of active set, as the kernels receive them (an int argument).
constexpr int kDense = int(ActiveKind::Dense);
constexpr int kIndices = int(ActiveKind::Indices);
constexpr int kPacked = int(ActiveKind::Packed);
constexpr int kThreshold = int(ActiveKind::Threshold);

// The prologues of a fused product (kernels/contract.h).
constexpr int kIdentity = int(Prologue::Identity);
constexpr int kRmsNorm = int(Prologue::RmsNorm);
constexpr int kSwiGLU = int(Prologue::SwiGLU);

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// One column of x', the product's input after the prologue, from its x (the gate half for SwiGLU)
// and `second` (the RMSNorm weight, or the up half): rounded to T as the unfused norm or activation
// would have written it, so the active set is decided on the same values.
template <typename T>
__device__ __forceinline__ float prologue_value(int prologue, float v, float second, float inv_rms) {
  const float r = prologue == kRmsNorm ? to_float(from_float<T>(v * inv_rms)) * second
                                       : v / (1.0f + expf(-v)) * second;
  return to_float(from_float<T>(r));
}

// Columns of x' (prologue_value).
template <typename T>
struct Input {
  const T* x;     // this row of x
  int stride;     // between columns
  int prologue;
  const T* norm;  // RMSNorm weight
  float inv_rms;  // this row's, RMSNorm only
  int K;

  // x' of the N columns ks (each in [0, K)), every load in flight together: the prologue's second
  // operand (norm weight, or the up half for SwiGLU) is loaded for all columns before any is used,
  // since a load behind each column's branch would cost one memory latency per column.
  template <int N>
  __device__ __forceinline__ void gather(const int (&ks)[N], float (&out)[N]) const {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = to_float(x[int64_t(ks[j]) * stride]);
    if (prologue == kIdentity) {
      return;
    }
    float second[N];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      second[j] = to_float(prologue == kRmsNorm ? norm[ks[j]] : x[int64_t(ks[j] + K) * stride]);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = prologue_value<T>(prologue, out[j], second[j], inv_rms);
  }
};

// The block's view of row m of x: with the RMSNorm prologue, the row's norm is reduced over K
// first (every block of the row computes it; x is a few KB, read from L2). `scratch` holds
// kWarps floats. Starts and ends with a barrier when it reduces.
template <typename T, int WARPS>
__device__ __forceinline__ Input<T> input_row(
    const T* x, int m, int K, int stride, int prologue, const T* norm, float eps, float* scratch) {
  const T* xm = x + int64_t(m) * (prologue == kSwiGLU ? 2 * K : K);
  Input<T> in{xm, stride, prologue, norm, 1.0f, K};
  if (prologue == kRmsNorm) {
    float sq = 0.0f;
    for (int k = threadIdx.x; k < K; k += WARPS * 32) {
      const float v = to_float(xm[int64_t(k) * stride]);
      sq = fmaf(v, v, sq);
    }
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
    __syncthreads();  // scratch may still be read from the previous row
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = sq;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < WARPS; ++i) total += scratch[i];
    in.inv_rms = rsqrtf(total / float(K) + eps);  // as MLX's rms_norm
    __syncthreads();
  }
  return in;
}

// Loads the BITS words that hold 32 consecutive codes, as wide as their alignment allows. Streaming
// loads (evict first) where every weight byte is read once per call; cached ones where other
// blocks read the same bytes soon after.
template <typename V, bool STREAMING>
__device__ __forceinline__ V load_words(const V* p) {
  if constexpr (STREAMING) {
    return __ldcs(p);
  } else {
    return __ldg(p);
  }
}

template <int BITS, bool STREAMING = true>
__device__ __forceinline__ void load_chunk(const uint32_t* p, uint32_t (&w)[BITS]) {
  if constexpr (BITS % 4 == 0) {
#pragma unroll
    for (int i = 0; i < BITS / 4; ++i) {
      const uint4 v = load_words<uint4, STREAMING>(reinterpret_cast<const uint4*>(p) + i);
      w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
    }
  } else if constexpr (BITS % 2 == 0) {
#pragma unroll
    for (int i = 0; i < BITS / 2; ++i) {
      const uint2 v = load_words<uint2, STREAMING>(reinterpret_cast<const uint2*>(p) + i);
      w[2 * i] = v.x; w[2 * i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < BITS; ++i) {
      w[i] = load_words<uint32_t, STREAMING>(p + i);
    }
  }
}

// Code r (0..31) of an LSB-first bitstream, as a float. r must be a compile-time constant after
// unrolling. The OR with 2^23's exponent makes the integer a float's mantissa: one LOP3 and one
// FADD instead of an integer-to-float conversion, whose throughput would cap the kernel.
template <int BITS>
__device__ __forceinline__ float code(const uint32_t (&w)[BITS], int r) {
  constexpr uint32_t mask = (1u << BITS) - 1;
  const int bit = r * BITS;
  const int word = bit >> 5;
  const int shift = bit & 31;
  uint32_t v = w[word] >> shift;
  if (shift + BITS > 32) {
    v |= w[word + 1] << (32 - shift);
  }
  return __int_as_float(0x4B000000u | (v & mask)) - 8388608.0f;
}

// acc[r] += xs * code r, for the 32 codes in w. For 2, 4 and 8 bits a code is masked in place,
// not shifted down: (w & (mask << p)) read as a float mantissa is code * 2^p, and xs * 2^-p is
// exact, so each code costs one LOP3, one FADD and one FFMA, with the same result bits as
// fmaf(xs, code, acc). Codes above mantissa bit 22 come from w >> 16.
template <int BITS>
__device__ __forceinline__ void accumulate_codes(
    const uint32_t (&w)[BITS], float xs, float (&acc)[32]) {
  if constexpr (BITS == 2 || BITS == 4 || BITS == 8) {
    constexpr int kPerWord = 32 / BITS;
    constexpr uint32_t mask = (1u << BITS) - 1;
#pragma unroll
    for (int i = 0; i < BITS; ++i) {
      const uint32_t lo = w[i];
      const uint32_t hi = w[i] >> 16;
#pragma unroll
      for (int j = 0; j < kPerWord; ++j) {
        const int p = j * BITS;
        const bool high = p + BITS > 23;
        const int q = high ? p - 16 : p;
        const uint32_t bits = (high ? hi : lo) & (mask << q);
        const float v = __int_as_float(0x4B000000u | bits) - 8388608.0f;
        acc[i * kPerWord + j] = fmaf(xs * (1.0f / float(1u << q)), v, acc[i * kPerWord + j]);
      }
    }
  } else {
#pragma unroll
    for (int r = 0; r < 32; ++r) acc[r] = fmaf(xs, code<BITS>(w, r), acc[r]);
  }
}

// The entries a launch walks: K columns, or the index list of the list kinds (a count-prefixed
// list's count clamped to [0, K], so that a corrupted list is never read past its end).
__device__ __forceinline__ int walked(int kind, const void* active, int n_host, int K, const int*& list) {
  list = nullptr;
  if (kind == kIndices) {
    list = static_cast<const int*>(active);
    return n_host;
  }
  if (kind == kPacked) {
    list = static_cast<const int*>(active) + 1;
    return min(max(static_cast<const int*>(active)[0], 0), K);
  }
  return K;
}

// Balanced share of n entries among `parts` workers: the first n % parts take one extra.
__device__ __forceinline__ void share(int n, int parts, int part, int& begin, int& count) {
  const int base = n / parts;
  const int extra = n % parts;
  begin = part * base + min(part, extra);
  count = base + (part < extra ? 1 : 0);
}

// Block-wide exclusive scan of one int per thread; returns the prefix, writes the total.
// `scratch` holds WARPS ints. Ends with a barrier, so scratch may be reused afterwards.
template <int WARPS>
__device__ __forceinline__ int block_exclusive_scan(int v, int* scratch, int& total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int t = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += t;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int i = 0; i < WARPS; ++i) {
    const int s = scratch[i];
    before += (i < warp) ? s : 0;
    total += s;
  }
  __syncthreads();
  return before + incl - v;
}

// The end of a block's work on one band and row m (y = residual + the product; residual may be
// null, and is read with a column stride: one row may be a view): sums the warps' partial rows and bias terms in
// a fixed order and writes y; with several splits, stores this block's rows in the workspace and
// counts it in, and the block that arrives last sums all splits in split order, writes y and
// resets the band's counter for the workspace's next use. Every output bit is reproducible, with no
// float atomics. `partial` holds WARPS rows of GS floats, `bias` WARPS floats; `arrived_last` is
// shared. Starts and ends with a barrier.
template <typename T, int GS, int WARPS>
__device__ __forceinline__ void write_band(
    const float (*partial)[GS], const float* bias, const T* __restrict__ residual, int r_stride, T* __restrict__ y,
    float* __restrict__ partials,
    int* __restrict__ counters, int m, int N, int band, int rank, int splits, int& arrived_last) {
  const int tid = threadIdx.x;
  const int bands = N / GS;
  __syncthreads();
  const int64_t y_row = int64_t(m) * N + int64_t(band) * GS;
  const int64_t slice = (int64_t(m) * bands + band) * splits;  // this band's partials
  if (tid < GS) {
    float total = 0.0f, bias_total = 0.0f;
#pragma unroll
    for (int i = 0; i < WARPS; ++i) {
      total += partial[i][tid];
      bias_total += bias[i];
    }
    if (splits == 1) {
      const float r = residual ? to_float(residual[(y_row + tid) * r_stride]) : 0.0f;
      y[y_row + tid] = from_float<T>(total + bias_total + r);
    } else {
      partials[(slice + rank) * GS + tid] = total + bias_total;
    }
  }
  if (splits > 1) {
    // Publish the partial rows, then count this block in; the last one in sums them all.
    __threadfence();
    __syncthreads();
    if (tid == 0) {
      int* counter = counters + int64_t(m) * bands + band;
      arrived_last = atomicAdd(counter, 1) == splits - 1;
      if (arrived_last) *counter = 0;  // every other block of this band has counted in
    }
    __syncthreads();
    if (arrived_last && tid < GS) {
      __threadfence();
      float total = 0.0f;
#pragma unroll 8
      for (int s = 0; s < splits; ++s) total += __ldcg(partials + (slice + s) * GS + tid);
      const float r = residual ? to_float(residual[(y_row + tid) * r_stride]) : 0.0f;
      y[y_row + tid] = from_float<T>(total + r);
    }
  }
  __syncthreads();  // shared memory is rewritten for the next row
}

} // namespace spqt
