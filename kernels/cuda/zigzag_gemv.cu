// Zigzag GEMV for NVIDIA GPUs: y = x @ W.T over the active input columns (docs/format.md).
//
// Geometry. A block of 256 threads owns one band (group_size output rows) and one share of the
// active-column list: `splits` blocks split a band's list evenly (the first n % splits take one
// extra entry). Inside a block, group_size/32 lanes share a column, each lane holding 32 rows'
// float32 partials in registers; a lane loads one activation, one scale and one bias per column
// and reads the column's codes with 8/16-byte loads, several columns in flight.
//
// Reduction, deterministic and in one launch: lanes, then warps (shared memory) in a fixed order.
// With several splits each block writes its float32 partial rows to a workspace and bumps the
// band's counter; the block that arrives last sums the partials in split order, writes y and
// resets the counter to zero for the workspace's next use. Which block arrives last varies; the
// summation order does not, so every output bit is reproducible. No float atomics.
//
// Kinds of active set (kernels/contract.h; run-time, uniform per launch): every column, an index
// list of length n_host, a count-prefixed list [n, idx...], or columns with |x| > threshold, collected by every
// block into shared memory (no list in global memory, no extra launch; the list is ordered by
// column modulo 256, then by column). Entries outside [0, K) are skipped.
//
// The threshold of the fused kind: one per column, t[k], or the scalar t_value, passed by value (MLX keeps
// scalars in unified memory, slow to read from every block).
//
// x is read with a column stride (a single row may be any strided view); several rows must be
// row-contiguous.
//
// Fused neighbours (kernels/contract.h): x is read through a prologue (RMSNorm, whose row norm every
// block reduces first, or SwiGLU over 2K columns), and a residual may be added to y.
//
// Gathered products (a mixture-of-experts layer, dispatch/primitives.h's ZigzagGatherGemv): w holds
// the bands of n_experts experts one after another, and row m of y multiplies expert experts[m]'s
// bands by row m / x_div of x (the k experts of a token share its input). A thresholded row takes
// its expert's threshold, t[experts[m]]. Ids are read as unsigned: a row whose expert is not below
// n_experts walks no column and is 0. experts is null for a plain product. The bands of y from
// first_bands on come from a second set of experts (w2, scales2, biases2), with the same x row and
// active columns: gate and up in one launch.
//
// Instantiated by the build with SPQT_NAME, SPQT_T, SPQT_BITS and SPQT_GS.
#include "zigzag.cuh"

namespace spqt {

template <typename T, int BITS, int GS>
__device__ __forceinline__ void zigzag_gemv(
    const T* __restrict__ x,
    const uint32_t* __restrict__ w,
    const T* __restrict__ scales,
    const T* __restrict__ biases,
    const void* __restrict__ active,
    T* __restrict__ y,
    float* __restrict__ partials,
    int* __restrict__ counters,
    int M, int N, int K, int x_stride, int kind, int n_host, int threshold_per_column,
    float t_value, int splits,
    const T* __restrict__ norm, const T* __restrict__ residual, int r_stride, int prologue, float eps,
    const unsigned* __restrict__ experts, int n_experts, int x_div,
    const uint32_t* __restrict__ w2, const T* __restrict__ scales2, const T* __restrict__ biases2, int first_bands) {
  constexpr int kListCapacity = 2048;  // fused-collection window, in entries
  constexpr int kLanesPerGroup = GS / 32;
  constexpr int kColsPerWarp = 32 / kLanesPerGroup;
  constexpr int kColsPerStep = kWarps * kColsPerWarp;
  constexpr int kWordsPerGroup = GS * BITS / 32;
  constexpr int kUnroll = BITS <= 2 ? 8 : BITS <= 4 ? 4 : 2;  // columns in flight per lane
  constexpr int kRowsPerLane = 32 / kColsPerWarp;  // after the in-warp reduction

  __shared__ float partial[kWarps][GS];
  __shared__ float partial_bias[kWarps];
  __shared__ int list[kListCapacity];
  __shared__ int scratch[kWarps];
  __shared__ float norm_scratch[kWarps];
  __shared__ int arrived_last;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int chunk = lane % kLanesPerGroup;  // which 32 rows of the group
  const int slot = warp * kColsPerWarp + lane / kLanesPerGroup;
  const int band = blockIdx.x / splits;
  const int rank = blockIdx.x % splits;

  // Which set of experts this block's band belongs to, and the band within it.
  const bool second = band >= first_bands;
  const int set_bands = second ? N / GS - first_bands : first_bands;
  const int set_band = second ? band - first_bands : band;
  const uint32_t* w_set = second ? w2 : w;
  const T* scales_set = second ? scales2 : scales;
  const T* biases_set = second ? biases2 : biases;

  for (int m = blockIdx.y; m < M; m += gridDim.y) {
    unsigned expert = 0;
    bool routed = true;
    float t_row = t_value;
    if (experts) {
      expert = experts[m];
      routed = expert < unsigned(n_experts);
      expert = routed ? expert : 0;
      if (kind == kThreshold) t_row = static_cast<const float*>(active)[expert];
    }
    const int64_t eb = int64_t(expert) * set_bands + set_band;  // this band of the row's expert
    const uint32_t* wb = w_set + eb * K * kWordsPerGroup + chunk * BITS;
    const T* sb = scales_set + eb * K;
    const T* bb = biases_set + eb * K;
    const Input<T> xin = input_row<T, kWarps>(x, m / x_div, K, x_stride, prologue, norm, eps, norm_scratch);

    // Size of the active set and this block's share of it.
    const int* cols;
    int n = walked(kind, active, n_host, K, cols);
    uint64_t my_mask = 0;
    int my_rank = 0;
    if (kind == kThreshold) {
      // Thread tid flags columns tid, tid + 256, ... (coalesced loads, all in flight); a block
      // scan gives every flag its rank in the list, so all blocks agree on the same list, in
      // the same order, without writing it anywhere.
      // Loads are unconditional (clamped index) and issued eight at a time, so the scan costs a
      // few memory latencies, not one per column.
      const float* t = static_cast<const float*>(active);
      const int per_thread = (K + kThreads - 1) / kThreads;
            for (int i0 = 0; i0 < per_thread; i0 += 8) {
        int ks[8];
        float v[8], th[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) ks[j] = min((i0 + j) * kThreads + tid, K - 1);
        xin.gather(ks, v);
#pragma unroll
        for (int j = 0; j < 8; ++j) th[j] = threshold_per_column ? t[ks[j]] : t_row;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (i0 + j < per_thread && (i0 + j) * kThreads + tid < K && fabsf(v[j]) > th[j]) {
            my_mask |= uint64_t(1) << (i0 + j);
          }
        }
      }
      my_rank = block_exclusive_scan<kWarps>(__popcll(my_mask), scratch, n);
    }
    if (!routed) {
      n = 0;
      my_mask = 0;
      my_rank = 0;
    }
    int begin, count;
    share(n, splits, rank, begin, count);
    const int windows = (kind == kThreshold) ? max(1, (count + kListCapacity - 1) / kListCapacity) : 1;

    float acc[32];
#pragma unroll
    for (int r = 0; r < 32; ++r) acc[r] = 0.0f;
    float bias_acc = 0.0f;

    for (int win = 0; win < windows; ++win) {
      int win_begin = begin, win_count = count;
      if (kind == kThreshold) {
        win_begin = begin + win * kListCapacity;
        win_count = min(kListCapacity, begin + count - win_begin);
        __syncthreads();  // the previous window's readers are done
        if (my_rank < win_begin + win_count && my_rank + __popcll(my_mask) > win_begin) {
          uint64_t bits = my_mask;
          int r = my_rank;
          while (bits) {
            const int i = __ffsll(bits) - 1;
            bits &= bits - 1;
            if (r >= win_begin && r < win_begin + win_count) list[r - win_begin] = i * kThreads + tid;
            ++r;
          }
        }
        __syncthreads();
      }
      for (int q = slot; q < win_count; q += kColsPerStep * kUnroll) {
        uint32_t words[kUnroll][BITS];
        float xs[kUnroll], xb[kUnroll];
        int ks[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int e = q + u * kColsPerStep;
          ks[u] = -1;
          if (e < win_count) {
            const int p = win_begin + e;
            ks[u] = (kind == kDense) ? p : (kind == kThreshold) ? list[e] : cols[p];
          }
        }
        int safe[kUnroll];
        float xv[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) safe[u] = unsigned(ks[u]) < unsigned(K) ? ks[u] : 0;
        xin.gather(safe, xv);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int k = ks[u];
          if (unsigned(k) < unsigned(K)) {
            load_chunk<BITS>(wb + k * kWordsPerGroup, words[u]);
            xs[u] = xv[u] * to_float(sb[k]);
            xb[u] = xv[u] * to_float(bb[k]);
          } else {
#pragma unroll
            for (int i = 0; i < BITS; ++i) words[u][i] = 0;
            xs[u] = 0.0f;
            xb[u] = 0.0f;
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          accumulate_codes<BITS>(words[u], xs[u], acc);
          bias_acc += (chunk == 0) ? xb[u] : 0.0f;
        }
      }
    }

    // In-warp reduction over the lanes that share a chunk: each step halves the rows a lane
    // keeps, so 32 partials need 16 + 8 + ... shuffles rather than 32 per step.
    constexpr int kSteps = 5 - (kLanesPerGroup == 1 ? 0 : kLanesPerGroup == 2 ? 1 : 2);
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      const int o = 16 >> step;
      const int half = 16 >> step;
      const bool upper = lane & o;
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        if (i >= half) break;  // a bound the unroller can fold, keeping acc in registers
        const float send = upper ? acc[i] : acc[i + half];
        const float keep = upper ? acc[i + half] : acc[i];
        acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
      }
    }
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) bias_acc += __shfl_xor_sync(0xffffffffu, bias_acc, o);
    const int row0 = chunk * 32 + (lane - chunk) % 32;
#pragma unroll
    for (int v = 0; v < kRowsPerLane; ++v) partial[warp][row0 + v] = acc[v];
    if (lane == 0) partial_bias[warp] = bias_acc;
    write_band<T, GS, kWarps>(partial, partial_bias, residual, r_stride, y, partials, counters, m, N, band, rank, splits,
                              arrived_last);
  }
}

} // namespace spqt

#ifdef SPQT_NAME
extern "C" __global__ void __launch_bounds__(spqt::kThreads, 2) SPQT_NAME(
    const SPQT_T* x, const uint32_t* w, const SPQT_T* scales, const SPQT_T* biases,
    const void* active, SPQT_T* y, float* partials, int* counters,
    int M, int N, int K, int x_stride, int kind, int n_host, int threshold_per_column,
    float t_value, int splits, const SPQT_T* norm, const SPQT_T* residual, int r_stride, int prologue, float eps,
    const unsigned* experts, int n_experts, int x_div,
    const uint32_t* w2, const SPQT_T* scales2, const SPQT_T* biases2, int first_bands) {
  spqt::zigzag_gemv<SPQT_T, SPQT_BITS, SPQT_GS>(
      x, w, scales, biases, active, y, partials, counters,
      M, N, K, x_stride, kind, n_host, threshold_per_column, t_value, splits, norm, residual, r_stride, prologue, eps,
      experts, n_experts, x_div, w2, scales2, biases2, first_bands);
}
#endif
