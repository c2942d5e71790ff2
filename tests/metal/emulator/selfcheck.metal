// Kernels that check the emulator itself: correct and deliberately broken synchronization.
#include <metal_stdlib>

#include "../../../kernels/metal/utils.h"

using namespace metal;

// out[t] = (t + 1) % threads + 1, passed through threadgroup memory; without the barrier a thread
// may read its neighbour's slot before the neighbour wrote it.
template <bool SYNC>
[[kernel]] void rotate(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]],
                       uint threads [[threads_per_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float slots[1024];
  slots[tid] = float(tid + 1);
  if (SYNC) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[tid] = slots[(tid + 1) % threads];
  (void)lane;
}

// A barrier only half of the threadgroup reaches.
[[kernel]] void divergent_barrier(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]],
                                  uint threads [[threads_per_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
  if (tid < threads / 2) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[tid] = float(lane);
}

// Four consecutive outputs per thread: simd_sum, exclusive prefix sum, shuffle down by 1 and by 5.
[[kernel]] void collectives(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]],
                            uint threads [[threads_per_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
  const float v = float(tid * tid % 7 + 1);
  out[4 * tid + 0] = simd_sum(v);
  out[4 * tid + 1] = simd_prefix_exclusive_sum(v);
  out[4 * tid + 2] = simd_shuffle_down(v, ushort(1));
  out[4 * tid + 3] = simd_shuffle_down(v, ushort(5));
  (void)threads;
  (void)lane;
}

instantiate_kernel("selfcheck_rotate_synced", rotate, true)
instantiate_kernel("selfcheck_rotate_unsynced", rotate, false)

// Non-template kernels register directly.
[[maybe_unused]] static const bool selfcheck_registered =
    ::simt::register_kernel("selfcheck_divergent_barrier", reinterpret_cast<void*>(&divergent_barrier),
                            typeid(&divergent_barrier)) &&
    ::simt::register_kernel("selfcheck_collectives", reinterpret_cast<void*>(&collectives),
                            typeid(&collectives));
