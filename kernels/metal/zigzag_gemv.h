// Zigzag GEMV on Apple GPUs (docs/format.md): y = x @ W.T over the active columns of x.
//
// Geometry (params.h): a threadgroup per (band, split, row m of y), two simdgroups of 32 lanes.
// The active list (or [0, K) for the dense walk) is split evenly over the splits * simdgroups
// workers of a band: worker w owns entries [begin, end), and the first n % workers workers take one
// extra entry. Within a worker, the simdgroup walks kColumnsPerStep entries at a time; the
// kLanesPerColumn lanes of one entry each unpack gs / kLanesPerColumn consecutive rows of the group
// and keep those rows' partial sums in registers. Every lane is bounded by its worker's own end.
//
// Reduction, in a fixed order (no atomics, deterministic): shuffles add the entries of a step,
// threadgroup memory adds the simdgroups, and with several splits zigzag_gemv_reduce adds the
// per-split partials in a second dispatch. The bias term sum_k x[k] * bias[b, k] is accumulated once
// per band (bias hoist) and added to every row.
//
// Fused neighbours (kernels/contract.h): x is read through a prologue (RMSNorm, whose row norm each
// threadgroup reduces first, or SwiGLU over 2K columns; prologue.h), and with has_residual the
// residual is added where y is written (here, or in zigzag_gemv_reduce with several splits).
//
// Several rows under a threshold (batched decode) walk the union of their active columns (or every
// column) with threshold_stride >= 0: each row keeps its own entries with |x'| > threshold[k *
// threshold_stride] and skips the others (reading neither their codes nor their scale and bias), so
// its result is what its own list would give.
//
// Gathered products (mixture of experts, n_experts >= 0): row m of y reads row m / x_div of x and the
// weight of expert e = experts[m], the (bands, K, words) slab at e * bands * K * words of w (scales and
// biases alike), and its threshold at threshold[e * threshold_expert_stride + k * threshold_stride].
// The host encodes it as the dense walk (rows of one threadgroup grid use different experts, so no
// one list serves them), each row keeping the entries above its expert's threshold. Ids are read as
// unsigned 32-bit (routers give int32 or uint32): a row whose expert is not below n_experts, a
// negative int32 id included, walks nothing and writes zeros.
//
// Two sets of weights (mlx-lm's gate and up experts as one launch): bands [0, bands_a) of y come from
// (w, scales, biases), bands [bands_a, N / GS) from (w2, scales2, biases2), each set stacking its own
// bands of every expert. Both read the same x' and active columns; a single set has bands_a = N / GS.
#pragma once

#include "params.h"
#include "prologue.h"
#include "utils.h"

using namespace metal;

// Code r of a group: bits [r * BITS, (r + 1) * BITS) of its LSB-first bitstream.
template <int BITS>
inline uint zigzag_code(const device uint32_t* words, int r) {
  const int bit = r * BITS;
  const int word = bit / 32;
  const int shift = bit % 32;
  uint v = words[word] >> shift;
  if (32 % BITS != 0 && shift + BITS > 32) {
    // 3, 5 and 6 bits: the code straddles two words.
    v |= words[word + 1] << (32 - shift);
  }
  return v & ((1u << BITS) - 1u);
}

template <typename T, int BITS, int GS, bool SPARSE>
[[kernel]] void zigzag_gemv(
    const device T* x [[buffer(0)]],
    const device uint32_t* w [[buffer(1)]],
    const device T* scales [[buffer(2)]],
    const device T* biases [[buffer(3)]],
    const device int32_t* active [[buffer(4)]],
    device T* y [[buffer(5)]],
    device float* partials [[buffer(6)]],
    const constant int& K [[buffer(7)]],
    const constant int& N [[buffer(8)]],
    const constant int& listed [[buffer(9)]],
    const device T* norm [[buffer(10)]],
    const device T* residual [[buffer(11)]],
    const constant int& prologue [[buffer(12)]],
    const constant float& eps [[buffer(13)]],
    const constant int& has_residual [[buffer(14)]],
    const device float* threshold [[buffer(15)]],
    const constant int& threshold_stride [[buffer(16)]],
    const device uint32_t* experts [[buffer(17)]],
    const constant int& x_div [[buffer(18)]],
    const constant int& n_experts [[buffer(19)]],
    const constant int& threshold_expert_stride [[buffer(20)]],
    const device uint32_t* w2 [[buffer(21)]],
    const device T* scales2 [[buffer(22)]],
    const device T* biases2 [[buffer(23)]],
    const constant int& bands_a [[buffer(24)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint3 tgs [[threadgroups_per_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  using namespace spqt::metal_params;
  namespace pro = spqt::metal_prologue;
  constexpr int ROWS = GS / kLanesPerColumn; // rows per lane: 4, 8 or 16
  constexpr int WORDS = GS * BITS / 32;      // words per group
  static_assert(ROWS % 4 == 0, "lanes hold their rows as float4");

  threadgroup float sg_rows[kGemvSimdgroups * GS];
  threadgroup float norm_scratch[kGemvSimdgroups];

  const int band = tg.x;
  const int split = tg.y;
  const int m = tg.z;
  const int splits = tgs.y;

  // The active entries: listed >= 0 is a plain list of that length, listed < 0 a count-prefixed one.
  int n = K;
  const device int32_t* list = active;
  if (SPARSE) {
    if (listed < 0) {
      n = clamp(active[0], 0, K);
      list = active + 1;
    } else {
      n = listed;
    }
  }

  // The expert of a gathered row; one not below n_experts leaves the row empty (y = 0).
  uint expert = 0;
  if (n_experts >= 0) {
    expert = experts[m];
    if (expert >= uint(n_experts)) {
      expert = 0;
      n = 0;
    }
  }

  // Balanced split of [0, n) over the band's workers (simdgroups).
  const int workers = splits * kGemvSimdgroups;
  const int worker = split * kGemvSimdgroups + int(sg);
  const int share = n / workers;
  const int extra = n % workers;
  const int begin = worker * share + min(worker, extra);
  const int end = begin + share + (worker < extra ? 1 : 0);

  const int slot = int(lane) / kLanesPerColumn;          // which entry of a step
  const int r0 = (int(lane) % kLanesPerColumn) * ROWS;   // first row of this lane

  const device T* xm = pro::row(x, n_experts >= 0 ? m / x_div : m, K, prologue);
  const float inv_rms = prologue == pro::kRmsNorm
      ? pro::inv_rms(xm, K, eps, norm_scratch, tid, kGemvThreads, sg, kGemvSimdgroups, lane)
      : 1.0f;
  // The band's set of weights, and its first group there: band `set_band` of the expert's set_bands.
  const bool second = band >= bands_a;
  const int set_bands = second ? N / GS - bands_a : bands_a;
  const int set_band = second ? band - bands_a : band;
  const int64_t group = int64_t(expert) * set_bands + set_band;
  const device uint32_t* wb = (second ? w2 : w) + group * K * WORDS;
  const device T* sb = (second ? scales2 : scales) + group * K;
  const device T* bb = (second ? biases2 : biases) + group * K;
  const device float* tm = threshold_stride >= 0 ? threshold + int64_t(expert) * threshold_expert_stride : threshold;

  float4 acc[ROWS / 4];
  for (int j = 0; j < ROWS / 4; ++j) {
    acc[j] = float4(0.0f);
  }
  float bias_acc = 0.0f;

  for (int p = begin + slot; p < end; p += kColumnsPerStep) {
    const int k = SPARSE ? list[p] : p;
    if (k < 0 || k >= K) {
      continue;
    }
    const float xk = pro::input(xm, norm, inv_rms, prologue, K, k);
    if (threshold_stride >= 0 && !(metal::abs(xk) > tm[int64_t(k) * threshold_stride])) {
      continue;  // not one of this row's active columns: its weight is not read (the bandwidth saved)
    }
    const float xs = xk * float(sb[k]);
    const device uint32_t* words = wb + int64_t(k) * WORDS;
    for (int j = 0; j < ROWS / 4; ++j) {
      const int r = r0 + 4 * j;
      const float4 q = float4(
          float(zigzag_code<BITS>(words, r)),
          float(zigzag_code<BITS>(words, r + 1)),
          float(zigzag_code<BITS>(words, r + 2)),
          float(zigzag_code<BITS>(words, r + 3)));
      acc[j] += xs * q;
    }
    if (r0 == 0) {
      bias_acc += xk * float(bb[k]);
    }
  }

  // Add the step's entries: lanes kLanesPerColumn apart own the same rows.
  for (int j = 0; j < ROWS / 4; ++j) {
    for (int delta = kSimdSize / 2; delta >= kLanesPerColumn; delta /= 2) {
      acc[j] += simd_shuffle_down(acc[j], ushort(delta));
    }
  }
  const float bias = simd_sum(bias_acc);

  if (slot == 0) {
    for (int j = 0; j < ROWS / 4; ++j) {
      for (int c = 0; c < 4; ++c) {
        sg_rows[int(sg) * GS + r0 + 4 * j + c] = acc[j][c] + bias;
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  for (int r = int(tid); r < GS; r += kGemvThreads) {
    float v = 0.0f;
    for (int s = 0; s < kGemvSimdgroups; ++s) {
      v += sg_rows[s * GS + r];
    }
    const int col = band * GS + r;
    if (splits == 1) {
      const int64_t at = int64_t(m) * N + col;
      y[at] = T(v + (has_residual ? float(residual[at]) : 0.0f));
    } else {
      partials[(int64_t(m) * splits + split) * N + col] = v;
    }
  }
}

// Second pass when a band is split over several threadgroups: y[m, i] = sum over splits, in order
// (plus the residual of a fused product).
template <typename T>
[[kernel]] void zigzag_gemv_reduce(
    const device float* partials [[buffer(0)]],
    device T* y [[buffer(1)]],
    const constant int& N [[buffer(2)]],
    const constant int& splits [[buffer(3)]],
    const constant int& size [[buffer(4)]],
    const device T* residual [[buffer(5)]],
    const constant int& has_residual [[buffer(6)]],
    uint index [[thread_position_in_grid]]) {
  const int i = int(index);
  if (i >= size) {
    return;
  }
  const int m = i / N;
  const int col = i % N;
  float v = 0.0f;
  for (int s = 0; s < splits; ++s) {
    v += partials[(int64_t(m) * splits + s) * N + col];
  }
  y[i] = T(v + (has_residual ? float(residual[i]) : 0.0f));
}
