// Active-column collection on Apple GPUs: out = [n, ascending k with |x[k]| > threshold[k], -1...].
//
// One threadgroup scans x in chunks of its size. Within a chunk, a simd prefix sum of the flags gives
// each lane its slot inside its simdgroup, and the simdgroup counts (threadgroup memory) give each
// simdgroup its offset, so the list is written in ascending order with no atomics. The unused tail is
// filled with -1, as the CPU reference does. A fused product's collection decides on x' (prologue.h):
// with RMSNorm the threadgroup reduces the row's norm first. Over several rows (x holds `rows` rows,
// at most kCollectMaxRows), a column is listed when any row's |x'| passes: the union that a batched
// product walks (each row then keeps only its own entries: zigzag_gemv.h's threshold_stride).
#pragma once

#include "params.h"
#include "prologue.h"
#include "utils.h"

using namespace metal;

template <typename T>
[[kernel]] void collect_active(
    const device T* x [[buffer(0)]],
    const device float* threshold [[buffer(1)]],
    device int32_t* out [[buffer(2)]],
    const constant int& K [[buffer(3)]],
    const constant int& threshold_stride [[buffer(4)]],
    const device T* norm [[buffer(5)]],
    const constant int& prologue [[buffer(6)]],
    const constant float& eps [[buffer(7)]],
    const constant int& rows [[buffer(8)]],
    uint tid [[thread_index_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint simdgroups [[simdgroups_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  using namespace spqt::metal_params;
  namespace pro = spqt::metal_prologue;
  threadgroup int sg_counts[kCollectMaxThreads / kSimdSize];
  threadgroup float norm_scratch[kCollectMaxThreads / kSimdSize];
  threadgroup float row_inv_rms[kCollectMaxRows];
  for (int r = 0; r < rows; ++r) {
    const float v = prologue == pro::kRmsNorm
        ? pro::inv_rms(pro::row(x, r, K, prologue), K, eps, norm_scratch, tid, threads, sg, simdgroups, lane)
        : 1.0f;
    if (tid == 0) {
      row_inv_rms[r] = v;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  int base = 0; // entries written by the previous chunks
  for (int k0 = 0; k0 < K; k0 += int(threads)) {
    const int k = k0 + int(tid);
    bool on = false;
    if (k < K) {
      const float t = threshold[int64_t(k) * threshold_stride];
      for (int r = 0; r < rows && !on; ++r) {
        on = metal::abs(pro::input(pro::row(x, r, K, prologue), norm, row_inv_rms[r], prologue, K, k)) > t;
      }
    }
    const int slot = simd_prefix_exclusive_sum(int(on));
    const int count = simd_sum(int(on));
    if (lane == 0) {
      sg_counts[sg] = count;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    int offset = base;
    int chunk = 0;
    for (int s = 0; s < int(simdgroups); ++s) {
      offset += s < int(sg) ? sg_counts[s] : 0;
      chunk += sg_counts[s];
    }
    if (on) {
      out[1 + offset + slot] = k;
    }
    base += chunk;
    // sg_counts is rewritten by the next chunk.
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  if (tid == 0) {
    out[0] = base;
  }
  for (int p = base + 1 + int(tid); p <= K; p += int(threads)) {
    out[p] = -1;
  }
}
