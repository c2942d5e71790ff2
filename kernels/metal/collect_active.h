// Active-column collection on Apple GPUs: out = [n, ascending k with |x[k]| > threshold[k], -1...].
//
// One threadgroup scans x in chunks of its size. Within a chunk, a simd prefix sum of the flags gives
// each lane its slot inside its simdgroup, and the simdgroup counts (threadgroup memory) give each
// simdgroup its offset, so the list is written in ascending order with no atomics. The unused tail is
// filled with -1, as the CPU reference does. A fused product's collection decides on x' (prologue.h):
// with RMSNorm the threadgroup reduces the row's norm first.
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
    uint tid [[thread_index_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint simdgroups [[simdgroups_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  using namespace spqt::metal_params;
  namespace pro = spqt::metal_prologue;
  threadgroup int sg_counts[kCollectMaxThreads / kSimdSize];
  threadgroup float norm_scratch[kCollectMaxThreads / kSimdSize];
  const float inv_rms = prologue == pro::kRmsNorm
      ? pro::inv_rms(x, K, eps, norm_scratch, tid, threads, sg, simdgroups, lane)
      : 1.0f;

  int base = 0; // entries written by the previous chunks
  for (int k0 = 0; k0 < K; k0 += int(threads)) {
    const int k = k0 + int(tid);
    const bool on =
        k < K && metal::abs(pro::input(x, norm, inv_rms, prologue, K, k)) > threshold[int64_t(k) * threshold_stride];
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
