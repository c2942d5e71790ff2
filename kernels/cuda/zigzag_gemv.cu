// Zigzag GEMV for NVIDIA GPUs: y = x @ W.T over the active input columns (docs/format.md).
//
// Geometry. A block of 256 threads owns one band (group_size output rows) at a time and one share
// of the active-column list: `splits` blocks split a band's list evenly (the first n % splits take
// one extra entry). With one split the block writes y; otherwise each writes its float32 partial
// rows and reduce_splits sums them in split order, so the result is bitwise reproducible with no
// atomics. Inside a block, group_size/32 lanes share a column, each lane
// holding 32 rows' float32 partials in registers; a lane loads one activation, one scale and one
// bias per column and reads the column's codes with 8/16-byte loads.
//
// Kinds of active set (run-time, uniform per launch): 0 every column, 1 an index list of length
// n_host, 2 a count-prefixed list [n, idx...], 3 columns with |x| > threshold, collected by every
// block into shared memory (no list in global memory, no extra launch). Entries outside [0, K)
// are skipped.
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
    void* __restrict__ out,
    int M, int N, int K, int kind, int n_host, int threshold_per_column, int splits) {
  constexpr int kListCapacity = 2048;  // fused-collection window, in entries
  constexpr int kLanesPerGroup = GS / 32;
  constexpr int kColsPerWarp = 32 / kLanesPerGroup;
  constexpr int kColsPerStep = kWarps * kColsPerWarp;
  constexpr int kWordsPerGroup = GS * BITS / 32;
  constexpr int kUnroll = BITS <= 4 ? 4 : 2;  // columns in flight per lane
  constexpr int kRowsPerLane = 32 / kColsPerWarp;  // after the in-warp reduction

  __shared__ float partial[kWarps][GS];
  __shared__ float partial_bias[kWarps];
  __shared__ int list[kListCapacity];
  __shared__ int scratch[kWarps];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int chunk = lane % kLanesPerGroup;  // which 32 rows of the group
  const int slot = warp * kColsPerWarp + lane / kLanesPerGroup;
  const int m = blockIdx.y;
  const int rank = blockIdx.x % splits;
  const int band_stride = gridDim.x / splits;
  const int bands = N / GS;
  const T* xm = x + int64_t(m) * K;

  // Size of the active set and this block's share of it.
  int n = K;
  const int* cols = nullptr;
  uint64_t my_mask = 0;
  int my_first = 0, my_rank = 0;
  if (kind == 1) {
    n = n_host;
    cols = static_cast<const int*>(active);
  } else if (kind == 2) {
    cols = static_cast<const int*>(active) + 1;
    n = min(max(static_cast<const int*>(active)[0], 0), K);
  } else if (kind == 3) {
    // Each thread flags a contiguous chunk of columns; a block scan gives every flag its rank in
    // the ascending list, so all blocks agree on the list without writing it anywhere.
    const float* t = static_cast<const float*>(active);
    const int per_thread = (K + kThreads - 1) / kThreads;
    my_first = tid * per_thread;
    for (int i = 0; i < per_thread; ++i) {
      const int k = my_first + i;
      if (k < K && fabsf(to_float(xm[k])) > t[threshold_per_column ? k : 0]) {
        my_mask |= uint64_t(1) << i;
      }
    }
    my_rank = block_exclusive_scan<kWarps>(__popcll(my_mask), scratch, n);
  }
  int begin, count;
  share(n, splits, rank, begin, count);
  const int windows = (kind == 3) ? max(1, (count + kListCapacity - 1) / kListCapacity) : 1;

  for (int band = blockIdx.x / splits; band < bands; band += band_stride) {
    const uint32_t* wb = w + int64_t(band) * K * kWordsPerGroup + chunk * BITS;
    const T* sb = scales + int64_t(band) * K;
    const T* bb = biases + int64_t(band) * K;
    float acc[32];
#pragma unroll
    for (int r = 0; r < 32; ++r) acc[r] = 0.0f;
    float bias_acc = 0.0f;

    for (int win = 0; win < windows; ++win) {
      int win_begin = begin, win_count = count;
      if (kind == 3) {
        win_begin = begin + win * kListCapacity;
        win_count = min(kListCapacity, begin + count - win_begin);
        if (windows > 1 || band == blockIdx.x / splits) {
          __syncthreads();  // the previous window's readers are done
          if (my_rank < win_begin + win_count && my_rank + __popcll(my_mask) > win_begin) {
            uint64_t bits = my_mask;
            int r = my_rank;
            while (bits) {
              const int i = __ffsll(bits) - 1;
              bits &= bits - 1;
              if (r >= win_begin && r < win_begin + win_count) list[r - win_begin] = my_first + i;
              ++r;
            }
          }
          __syncthreads();
        }
      }
      for (int q = slot; q < win_count; q += kColsPerStep * kUnroll) {
        uint32_t words[kUnroll][BITS];
        float xs[kUnroll], xb[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int e = q + u * kColsPerStep;
          int k = -1;
          if (e < win_count) {
            const int p = win_begin + e;
            k = (kind == 0) ? p : (kind == 3) ? list[e] : cols[p];
          }
          if (unsigned(k) < unsigned(K)) {
            load_chunk<BITS>(wb + int64_t(k) * kWordsPerGroup, words[u]);
            const float xv = to_float(xm[k]);
            xs[u] = xv * to_float(sb[k]);
            xb[u] = xv * to_float(bb[k]);
          } else {
#pragma unroll
            for (int i = 0; i < BITS; ++i) words[u][i] = 0;
            xs[u] = 0.0f;
            xb[u] = 0.0f;
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
          for (int r = 0; r < 32; ++r) acc[r] = fmaf(xs[u], code<BITS>(words[u], r), acc[r]);
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
    __syncthreads();
    if (tid < GS) {
      float total = 0.0f, bias_total = 0.0f;
#pragma unroll
      for (int i = 0; i < kWarps; ++i) {
        total += partial[i][tid];
        bias_total += partial_bias[i];
      }
      const int64_t row = int64_t(band) * GS + tid;
      if (splits == 1) {
        static_cast<T*>(out)[int64_t(m) * N + row] = from_float<T>(total + bias_total);
      } else {
        static_cast<float*>(out)[(int64_t(rank) * M + m) * N + row] = total + bias_total;
      }
    }
    __syncthreads();  // `partial` is rewritten by the next band
  }
}

// y = the sum of the splits' partial rows, in split order.
template <typename T>
__device__ __forceinline__ void reduce_splits(
    const float* __restrict__ partials, T* __restrict__ y, int count, int splits) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  float total = 0.0f;
  for (int s = 0; s < splits; ++s) total += partials[int64_t(s) * count + i];
  y[i] = from_float<T>(total);
}

} // namespace spqt

#ifdef SPQT_NAME
// Parameters in MLX's precompiled-kernel order: inputs, outputs, scalars.
extern "C" __global__ void __launch_bounds__(spqt::kThreads) SPQT_NAME(
    const SPQT_T* x, const uint32_t* w, const SPQT_T* scales, const SPQT_T* biases,
    const void* active, void* out,
    int M, int N, int K, int kind, int n_host, int threshold_per_column, int splits) {
  spqt::zigzag_gemv<SPQT_T, SPQT_BITS, SPQT_GS>(
      x, w, scales, biases, active, out, M, N, K, kind, n_host, threshold_per_column, splits);
}
#endif

#ifdef SPQT_REDUCE_NAME
extern "C" __global__ void SPQT_REDUCE_NAME(const float* partials, SPQT_T* y, int count, int splits) {
  spqt::reduce_splits<SPQT_T>(partials, y, count, splits);
}
#endif
