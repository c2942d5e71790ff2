// Zigzag GEMV on the tensor cores for dense walks, fed by Hopper's bulk-copy engine: y = x' @ W.T
// over every column, one row of 16-bit x, 4-bit codes in groups of 64 or 128 (docs/format.md). Same
// parameters and MMA formulation (tensor_core.cuh) as zigzag_gemv_mma.cu, which serves every other
// case; dispatch/cuda.cpp picks this one where its conditions hold (sm_90, a contiguous x, 16-byte
// aligned operands, K a multiple of 16).
//
// Why. zigzag_gemv_mma.cu stages a window of entries with the whole block before streaming it, so
// every block alternates between phases with few bytes in flight, in step with every other block
// of a one-wave grid. In a dense walk, a stage's codes, x, scales and biases are four contiguous
// ranges: one producer warp keeps a ring of stages filled with a few bulk copies each
// (cp.async.bulk, completing on an mbarrier with their byte count), and eight consumer warps turn
// each landed stage into B terms and MMAs, then hand it back. The next stage's bytes are in flight
// while the consumers work on this one. Measured on an H200 (BENCHMARKS.md): gathering x, scale and
// bias per entry with 4-byte asynchronous copies instead made the producer the bottleneck (about
// 500 instructions per stage); with bulk copies it issues a handful.
//
// Per block: one band and a contiguous share of its columns, a multiple of 16 (so that every copied
// range starts 16-byte aligned, and a range rounded up to 16 bytes stays inside the row: K is a
// multiple of 16). A stage is 16 KB of codes. Consumer warp w takes tiles w, w + 8, ... of each
// stage; its lanes build the B terms of those tiles' entries (x', the prologue's output, times the
// scale, as bf16 terms; the bias term), then run the MMAs. Rows are reduced over warps in a fixed
// order and over splits through the workspace (write_band): every output bit is reproducible.
//
// Instantiated by the build with SPQT_NAME, SPQT_T (16-bit), SPQT_BITS (4) and SPQT_GS. The build
// also emits PTX for older GPUs, where the kernel is a stub: the dispatch never launches it there.
#include "tensor_core.cuh"

namespace spqt {

namespace bulk {

constexpr int kConsumers = 8;                       // warps that run the MMAs
constexpr int kThreadsAll = (kConsumers + 1) * 32;  // and one producer warp (kernels/contract.h)
static_assert(kThreadsAll == kBulkThreads, "the dispatch launches kBulkThreads");

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

constexpr int kRing = 2;  // stages in the ring (16 KB each; deeper rings measured no faster)

__device__ __forceinline__ uint32_t smem(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void barrier_init(uint64_t* b, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void arrive(uint64_t* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem(b)) : "memory");
}
// Arrives, and expects `bytes` more of bulk copies before the phase completes.
__device__ __forceinline__ void arrive_expecting(uint64_t* b, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem(b)), "r"(bytes) : "memory");
}
// Waits until the phase of b with this parity has completed.
__device__ __forceinline__ void wait(uint64_t* b, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(smem(b)),
      "r"(parity)
      : "memory");
}
// `bytes` (a multiple of 16) from global to shared memory, both 16-byte aligned, counted on b.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* b) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem(dst)),
               "l"(src), "r"(bytes), "r"(smem(b))
               : "memory");
}

template <typename T, int GS>
__device__ __forceinline__ void zigzag_gemv(
    const T* __restrict__ x,
    const uint32_t* __restrict__ w,
    const T* __restrict__ scales,
    const T* __restrict__ biases,
    T* __restrict__ y,
    float* __restrict__ partials,
    int* __restrict__ counters,
    int N, int K, int splits,
    const T* __restrict__ norm, const T* __restrict__ residual, int r_stride, int prologue, float eps) {
  static_assert(sizeof(T) == 2, "16-bit x: its terms and copies are sized for two bytes");
  constexpr int kGroupBytes = GS / 2;
  constexpr int kStage = 16384 / kGroupBytes;  // entries per stage
  constexpr int kTiles = kStage / 16;
  constexpr int kTilesPerWarp = kTiles / kConsumers;
  constexpr int kEntriesPerWarp = kTilesPerWarp * 16;
  constexpr int kRounds = kEntriesPerWarp / 32;  // entries per lane and stage
  constexpr int kTerms = tensor_core_terms(sizeof(T));
  static_assert(kTiles % kConsumers == 0 && kEntriesPerWarp % 32 == 0, "equal shares of a stage");

  __shared__ __align__(128) uint8_t codes[kRing][kStage * kGroupBytes];
  __shared__ __align__(16) T xs[kRing][kStage];
  __shared__ __align__(16) T second[kRing][kStage];  // the RMSNorm weight or SwiGLU's up half
  __shared__ __align__(16) T ss[kRing][kStage];
  __shared__ __align__(16) T bs[kRing][kStage];
  __shared__ __align__(8) uint64_t full[kRing], empty[kRing];
  __shared__ __align__(8) uint16_t bterm[kConsumers][kTerms][kEntriesPerWarp];
  __shared__ float partial[kConsumers][GS];
  __shared__ float bias_part[kConsumers];
  __shared__ float norm_scratch[kThreadsAll / 32];
  __shared__ int arrived_last;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int band = blockIdx.x / splits;
  const int rank = blockIdx.x % splits;
  const int share = ((K + splits - 1) / splits + 15) & ~15;
  const int begin = min(rank * share, K);
  const int count = min(share, K - begin);
  const int stages = (count + kStage - 1) / kStage;

  if (tid == 0) {
    for (int i = 0; i < kRing; ++i) {
      barrier_init(&full[i], 1);           // the producer's arrival; then the copies' bytes
      barrier_init(&empty[i], kConsumers * 32);  // every consumer lane is done with the stage
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  // With the RMSNorm prologue, the row's norm first (every thread takes part; ends with a barrier).
  const Input<T> xin = input_row<T, kThreadsAll / 32>(x, 0, K, 1, prologue, norm, eps, norm_scratch);
  __syncthreads();

  if (warp == kConsumers) {
    // The producer: lane 0 issues a stage's copies once its slot is free (the warp waits together).
    const char* wband = reinterpret_cast<const char*>(w + int64_t(band) * K * (kGroupBytes / 4));
    const T* aux = prologue == kRmsNorm ? norm : prologue == kSwiGLU ? x + K : nullptr;
    for (int s = 0; s < stages; ++s) {
      const int slot = s % kRing;
      if (s >= kRing) wait(&empty[slot], ((s / kRing) - 1) & 1);
      if (lane == 0) {
        const int first = begin + s * kStage;
        const int len = min(kStage, begin + count - first);
        const uint32_t code_bytes = uint32_t(len) * kGroupBytes;
        const uint32_t side_bytes = uint32_t((len + 7) & ~7) * sizeof(T);  // whole 16-byte units, inside K
        arrive_expecting(&full[slot], code_bytes + (aux ? 4 : 3) * side_bytes);
        bulk_copy(codes[slot], wband + int64_t(first) * kGroupBytes, code_bytes, &full[slot]);
        bulk_copy(xs[slot], x + first, side_bytes, &full[slot]);
        bulk_copy(ss[slot], scales + int64_t(band) * K + first, side_bytes, &full[slot]);
        bulk_copy(bs[slot], biases + int64_t(band) * K + first, side_bytes, &full[slot]);
        if (aux) bulk_copy(second[slot], aux + first, side_bytes, &full[slot]);
      }
      __syncwarp();
    }
  } else {
    const tc::Magic magic;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int column = g < kTerms ? g : 0;  // columns n >= kTerms of B are never read back
    float acc[GS / 16][4];
#pragma unroll
    for (int j = 0; j < GS / 16; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    float bias_acc = 0.0f;
    for (int s = 0; s < stages; ++s) {
      const int slot = s % kRing;
      const int len = min(kStage, count - s * kStage);
      wait(&full[slot], (s / kRing) & 1);
      // Lane l builds the terms of this warp's entries q = l, l + 32, ...: tile q / 16, column q % 16.
#pragma unroll
      for (int r = 0; r < kRounds; ++r) {
        const int q = r * 32 + lane;
        const int e = (warp + (q >> 4) * kConsumers) * 16 + (q & 15);
        float xv = 0.0f, sv = 0.0f, bv = 0.0f;
        if (e < len) {  // past the share's end: zero terms (the codes there are stale but finite)
          xv = to_float(xs[slot][e]);
          if (prologue != kIdentity) xv = prologue_value<T>(prologue, xv, to_float(second[slot][e]), xin.inv_rms);
          sv = to_float(ss[slot][e]);
          bv = to_float(bs[slot][e]);
        }
        tc::stage_terms<kTerms>(xv, sv, bv, bterm[warp], tc::term_slot(q), bias_acc);
      }
      __syncwarp();
#pragma unroll
      for (int i = 0; i < kTilesPerWarp; ++i) {
        const uint8_t* tile = codes[slot] + (warp + i * kConsumers) * 16 * kGroupBytes;
        const uint2 b = *reinterpret_cast<const uint2*>(&bterm[warp][column][i * 16 + 4 * t]);
        tc::mma_tile<GS>(acc, tile, b, g, t, magic);
      }
      __syncwarp();  // every lane has read the terms before the next stage's overwrite them
      // Every lane arrives after its own last read of the stage: one arrival per warp after a
      // __syncwarp is what the PTX memory model orders too, but compute-sanitizer's racecheck counts
      // only a thread's own arrival as ordering its reads before the next copy into the slot (a
      // probe measured it: per-warp arrivals were reported as hazards, per-lane ones were not).
      arrive(&empty[slot]);
    }
    tc::store_rows<GS, kTerms>(acc, 0, partial[warp], lane);
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) bias_acc += __shfl_xor_sync(0xffffffffu, bias_acc, o);
    if (lane == 0) bias_part[warp] = bias_acc;
  }
  write_band<T, GS, kConsumers>(partial, bias_part, residual, r_stride, y, partials, counters, 0, N, band, rank, splits,
                                arrived_last);
}

#endif

} // namespace bulk

} // namespace spqt

#ifdef SPQT_NAME
// Three resident blocks per multiprocessor (at most 75 registers and 45 KB of shared memory each).
extern "C" __global__ void __launch_bounds__(spqt::bulk::kThreadsAll, 3) SPQT_NAME(
    const SPQT_T* x, const uint32_t* w, const SPQT_T* scales, const SPQT_T* biases,
    const void* active, SPQT_T* y, float* partials, int* counters,
    int M, int N, int K, int x_stride, int kind, int n_host, int threshold_per_column,
    float t_value, int splits, const SPQT_T* norm, const SPQT_T* residual, int r_stride, int prologue, float eps) {
  static_assert(SPQT_BITS == 4, "the tensor-core kernels read 4-bit codes");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Dense walks of one contiguous row: active, M, x_stride, kind, n_host and the thresholds are not read.
  spqt::bulk::zigzag_gemv<SPQT_T, SPQT_GS>(
      x, w, scales, biases, y, partials, counters, N, K, splits, norm, residual, r_stride, prologue, eps);
#else
  __trap();
#endif
}
#endif
