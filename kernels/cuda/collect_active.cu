// Active-column collector for NVIDIA GPUs: out = [n, ascending k with |x[k]| > t[k], -1...].
// One block: each thread flags a contiguous run of up to 32 columns, a block scan turns flags into
// list positions, and tiles of 1024*32 columns are taken in order. Deterministic and race-free
// (no atomics). x is read with a stride, so any view of one row will do. The threshold is one
// per column or a scalar passed by value, as in zigzag_gemv.cu. The fused GEMV does this itself; this kernel serves explicit collect_active().
#include "zigzag.cuh"

namespace spqt {

constexpr int kCollectThreads = 1024;

template <typename T>
__device__ __forceinline__ void collect_active(
    const T* __restrict__ x, const float* __restrict__ t, int32_t* __restrict__ out, int K,
    int x_stride, int threshold_per_column, float t_value) {
  __shared__ int scratch[kCollectThreads / 32];
  const int tid = threadIdx.x;
  int written = 0;
  for (int tile = 0; tile < K; tile += kCollectThreads * 32) {
    const int per_thread = min(32, (K - tile + kCollectThreads - 1) / kCollectThreads);
    const int first = tile + tid * per_thread;
    uint32_t mask = 0;
    for (int i = 0; i < per_thread; ++i) {
      const int k = first + i;
      if (k < K && fabsf(to_float(x[int64_t(k) * x_stride])) > (threshold_per_column ? t[k] : t_value)) mask |= 1u << i;
    }
    int total;
    int pos = written + block_exclusive_scan<kCollectThreads / 32>(__popc(mask), scratch, total);
    while (mask) {
      const int i = __ffs(mask) - 1;
      mask &= mask - 1;
      out[1 + pos++] = first + i;
    }
    written += total;
  }
  for (int p = written + 1 + tid; p <= K; p += kCollectThreads) out[p] = -1;
  if (tid == 0) out[0] = written;
}

} // namespace spqt

#ifdef SPQT_COLLECT_NAME
extern "C" __global__ void __launch_bounds__(spqt::kCollectThreads) SPQT_COLLECT_NAME(
    const SPQT_T* x, const float* t, int32_t* out, int K, int x_stride, int threshold_per_column, float t_value) {
  spqt::collect_active<SPQT_T>(x, t, out, K, x_stride, threshold_per_column, t_value);
}
#endif
