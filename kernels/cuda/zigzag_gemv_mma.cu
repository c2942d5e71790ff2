// Zigzag GEMV on the tensor cores, for 4-bit codes and group sizes 64 and 128: y = x @ W.T over the
// active input columns (docs/format.md). Same parameters and launch as zigzag_gemv.cu, which serves
// every other format; dispatch/cuda.cpp picks this one where it measured faster.
//
// Why tensor cores. Reading 4-bit weights at full bandwidth leaves an SM about four instructions
// per code; float32 arithmetic spends three on unpacking and multiplying alone. Here mma.sync
// multiplies 256 codes per warp instruction, accumulating in float32 (the formulation, and which
// lane holds what: tensor_core.cuh). x * bias is the same for every row and summed once per block
// in float32 ("bias hoist").
//
// Per block: one band and one share of the work. Dense and fused-threshold launches split the
// band's columns (each block scans only its own columns for the fused active set); index lists
// are split evenly. The work is staged in shared memory a window at a time: the entries' byte
// offsets and B terms (x, scale and bias read once per block, a thread's loads all in flight
// together, a block scan placing the active columns of the fused kind; at low density a window
// gathers several chunks' active columns). Then each warp streams its tiles through a ring of
// kStages shared-memory buffers with cp.async, kStages - 1 tiles ahead of its MMAs; dense walks and
// lists start those copies before their B terms are staged. Rows are reduced over warps in a
// fixed order and over splits through the workspace (the last block in sums them in split
// order), so every output bit is reproducible.
//
// Fused neighbours as in zigzag_gemv.cu: x' (the prologue's output) is what is staged and decided on.
//
// Instantiated by the build with SPQT_NAME, SPQT_T, SPQT_BITS (4), SPQT_GS and SPQT_MANY_ROWS.
#include "tensor_core.cuh"

namespace spqt {

namespace mma4 {

// Entries staged per step (four per thread, two with several rows: more would spill the staging
// registers) and per window: the fused collection of one row gathers up to two steps' active
// columns, where shared memory allows. Several rows keep a term array per row and term in shared
// memory, so their windows are shorter.
template <int ROWS>
constexpr int kChunk = ROWS == 1 ? 1024 : 512;
template <int GS, int ROWS>
constexpr int kCap = ROWS == 1 && GS == 64 ? 2 * kChunk<ROWS> : kChunk<ROWS>;

// 16 bytes from global to shared memory, asynchronously (no registers held while in flight).
__device__ __forceinline__ void copy16(void* dst, const void* src) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void copy_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void copy_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// ROWS: rows of x per pass, 1 or tensor_core_rows (kernels/contract.h). A pass reads each active
// group once for all its rows; its active set is the union of the rows' (the fused kind: columns
// where some row has |x'| > t), and every row's own inactive entries get zero terms, so each row's
// result is what a pass of its own would give. A pass of fewer rows stages only theirs: B's columns
// of the missing rows hold stale terms, and their D columns are never read back.
template <typename T, int GS, int ROWS>
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
    const T* __restrict__ norm, const T* __restrict__ residual, int r_stride, int prologue, float eps) {
  constexpr int kGroupBytes = GS / 2;                   // 4-bit codes
  constexpr int kTileBytes = 16 * kGroupBytes;          // 16 columns of one band
  constexpr int kCopies = kTileBytes / (32 * 16);       // 16-byte copies per lane and tile
  constexpr int kPartsPerGroup = kGroupBytes / 16;
  constexpr int kMmas = GS / 16;
  constexpr int kTerms = tensor_core_terms(sizeof(T));
  constexpr int kColumns = ROWS * kTerms;               // of B that are read back
  constexpr int kStages = 4;  // tile buffers per warp (more measured no faster)
  constexpr int kStep = kChunk<ROWS>;
  constexpr int kWindow = kCap<GS, ROWS>;
  constexpr int kPerThread = kStep / kThreads;
  static_assert(kStep % kThreads == 0, "a staging step gives every thread the same number of entries");
  static_assert(ROWS == 1 || ROWS == tensor_core_rows(sizeof(T)), "one row, or as many as the MMA holds");
  static_assert(kColumns <= 8, "the MMA's B has 8 columns");

  __shared__ __align__(16) uint8_t stage[kWarps][kStages][kTileBytes];
  __shared__ __align__(16) uint32_t offsets[kWindow];  // the entries' groups, in bytes from the band's start
  __shared__ __align__(16) uint16_t bterm[kColumns][kWindow];
  __shared__ float partial[kWarps][GS];
  __shared__ float bias_part[kWarps];
  __shared__ int scratch[kWarps];
  __shared__ float norm_scratch[kWarps];
  __shared__ int arrived_last;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int column = g < kColumns ? g : 0;  // columns n >= kColumns of B are never read back
  const int band = blockIdx.x / splits;
  const int rank = blockIdx.x % splits;
  const char* wband = reinterpret_cast<const char*>(w + int64_t(band) * K * (kGroupBytes / 4));
  const tc::Magic magic;
  const T* sb = scales + int64_t(band) * K;
  const T* bb = biases + int64_t(band) * K;
  const float* th = static_cast<const float*>(active);
  const bool by_column = kind == kDense || kind == kThreshold;  // split the columns, else the list

  for (int m0 = blockIdx.y * ROWS; m0 < M; m0 += gridDim.y * ROWS) {
    const int rows = ROWS == 1 ? 1 : min(ROWS, M - m0);  // uniform over the block
    Input<T> xin[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (r < rows) xin[r] = input_row<T, kWarps>(x, m0 + r, K, x_stride, prologue, norm, eps, norm_scratch);
    }
    // x' of the rows at the columns ks; rows past the pass's last read as zero.
    auto gather = [&](const int (&ks)[kPerThread], float (&xv)[ROWS][kPerThread]) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (r < rows) {
          xin[r].gather(ks, xv[r]);
        } else {
#pragma unroll
          for (int j = 0; j < kPerThread; ++j) xv[r][j] = 0.0f;
        }
      }
    };
    const int* list;
    const int n = walked(kind, active, n_host, K, list);
    int begin, count;
    share(n, splits, rank, begin, count);

    float acc[kMmas][4];
#pragma unroll
    for (int j = 0; j < kMmas; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    float bias_acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) bias_acc[r] = 0.0f;

    const int end = begin + count;
    int cursor = begin;
    while (cursor < end) {
      // Each warp streams its tiles (warp, warp + 8, ...) of the staged window through a ring of
      // kStages tile buffers with asynchronous copies, kStages - 1 tiles ahead of its MMAs.
      int total = 0, padded = 0, mine_tiles = 0;
      auto issue = [&](int i) {
        if (i < mine_tiles) {
          const int tile = warp + i * kWarps;
          uint8_t* buf = stage[warp][i % kStages];
#pragma unroll
          for (int c = 0; c < kCopies; ++c) {
            const int q = c * 32 + lane;
            const int col = q / kPartsPerGroup;
            const int part = q % kPartsPerGroup;
            copy16(buf + col * kGroupBytes + part * 16, wband + offsets[tile * 16 + col] + part * 16);
          }
        }
        copy_commit();
      };
      // Entry p of row r: its x' (zero where the row leaves the column out) times scale and bias.
      auto stage_row = [&](int p, int r, float xv, float s, float b) {
        tc::stage_terms<kTerms>(xv, s, b, bterm + r * kTerms, tc::term_slot(p), bias_acc[r]);
      };
      auto pad = [&] {
        padded = (total + 15) & ~15;
        mine_tiles = padded / 16 > warp ? (padded / 16 - warp + kWarps - 1) / kWarps : 0;
        if (tid < padded - total) {  // the last tile's padding: column 0, zero terms
          offsets[total + tid] = 0;
#pragma unroll
          for (int i = 0; i < kColumns; ++i) bterm[i][tc::term_slot(total + tid)] = 0;
        }
      };
      __syncthreads();  // the previous window's readers are done with the staging arrays
      if (kind == kThreshold) {
        // Fused collection: scan chunks of the block's columns (x, threshold, scale and bias of
        // a chunk all in flight together), keeping the active ones in order, until another chunk
        // might not fit; at low density one window then holds many chunks' active columns.
        do {
          const int len = min(kStep, end - cursor);
          int ks[kPerThread];
          float xv[ROWS][kPerThread], tv[kPerThread], sv[kPerThread], bv[kPerThread];
          bool on[kPerThread];
          int mine = 0;
#pragma unroll
          for (int j = 0; j < kPerThread; ++j) {
            const int e = j * kThreads + tid;
            on[j] = e < len;
            ks[j] = on[j] ? cursor + e : 0;
          }
          gather(ks, xv);
#pragma unroll
          for (int j = 0; j < kPerThread; ++j) {
            tv[j] = threshold_per_column ? th[ks[j]] : t_value;
            sv[j] = to_float(sb[ks[j]]);
            bv[j] = to_float(bb[ks[j]]);
          }
#pragma unroll
          for (int j = 0; j < kPerThread; ++j) {
            bool any = false;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
              const bool kept = r < rows && fabsf(xv[r][j]) > tv[j];
              xv[r][j] = kept ? xv[r][j] : 0.0f;
              any = any || kept;
            }
            on[j] = on[j] && any;
            mine += on[j];
          }
          int chunk_total;
          int pos = total + block_exclusive_scan<kWarps>(mine, scratch, chunk_total);
#pragma unroll
          for (int j = 0; j < kPerThread; ++j) {
            if (!on[j]) continue;
            offsets[pos] = uint32_t(ks[j]) * kGroupBytes;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
              if (r < rows) stage_row(pos, r, xv[r][j], sv[j], bv[j]);
            }
            ++pos;
          }
          total += chunk_total;
          cursor += len;
        } while (cursor < end && total <= kWindow - kStep);
        pad();
        __syncthreads();
#pragma unroll
        for (int i = 0; i < kStages - 1; ++i) issue(i);
      } else {
        // Dense walks and index lists: one chunk per window, staged in two steps so that the
        // warps start copying codes before x * scale and the bias terms are ready: first the
        // columns, then (while those copies fly) the terms. The scale and bias loads (DRAM) are
        // issued with the columns, before the barrier, since waiting for them was the largest
        // stall of the staging (3-7 % of the kernel's time, measured). Every entry keeps its
        // place; an out-of-range one reads column 0 with zero terms.
        const int len = min(kStep, end - cursor);
        int ks[kPerThread];
        bool on[kPerThread];
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) {
          const int e = j * kThreads + tid;
          ks[j] = (e < len) ? (by_column ? cursor + e : list[cursor + e]) : -1;
        }
        T sraw[kPerThread], braw[kPerThread];
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) {
          on[j] = unsigned(ks[j]) < unsigned(K);
          ks[j] = on[j] ? ks[j] : 0;
          sraw[j] = sb[ks[j]];
          braw[j] = bb[ks[j]];
          if (j * kThreads + tid < len) offsets[j * kThreads + tid] = uint32_t(ks[j]) * kGroupBytes;
        }
        total = len;
        pad();
        __syncthreads();
#pragma unroll
        for (int i = 0; i < kStages - 1; ++i) issue(i);
        float xv[ROWS][kPerThread], sv[kPerThread], bv[kPerThread];
        gather(ks, xv);
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) {
          sv[j] = to_float(sraw[j]);
          bv[j] = to_float(braw[j]);
        }
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) {
          const int e = j * kThreads + tid;
          if (e >= len) continue;
#pragma unroll
          for (int r = 0; r < ROWS; ++r) {
            if (r < rows) stage_row(e, r, on[j] ? xv[r][j] : 0.0f, sv[j], bv[j]);
          }
        }
        cursor += len;
      }
      __syncthreads();
      for (int i = 0; i < mine_tiles; ++i) {
        issue(i + kStages - 1);
        copy_wait<kStages - 1>();
        __syncwarp();
        const int tile = warp + i * kWarps;
        const uint8_t* buf = stage[warp][i % kStages];
        const uint2 b = *reinterpret_cast<const uint2*>(&bterm[column][tile * 16 + 4 * t]);
        tc::mma_tile<GS>(acc, buf, b, g, t, magic);
        __syncwarp();  // the buffer is refilled by the next issue
      }
      copy_wait<0>();
    }

#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (r >= rows) break;
      tc::store_rows<GS, kTerms>(acc, r, partial[warp], lane);
      float bias_sum = bias_acc[r];
#pragma unroll
      for (int o = 16; o >= 1; o >>= 1) bias_sum += __shfl_xor_sync(0xffffffffu, bias_sum, o);
      if (lane == 0) bias_part[warp] = bias_sum;
      write_band<T, GS, kWarps>(partial, bias_part, residual, r_stride, y, partials, counters, m0 + r, N, band, rank,
                                splits, arrived_last);
    }
  }
}

} // namespace mma4

} // namespace spqt

#ifdef SPQT_NAME
// Four resident blocks per multiprocessor (64 registers); group size 128 keeps twice the partials.
// SPQT_MANY_ROWS: one row per pass (0), or as many as the MMA holds (1, tensor_core_rows), whose
// staging holds every row's x' and runs without spills in up to 128 registers (two blocks, as the
// dispatch launches).
extern "C" __global__ void __launch_bounds__(spqt::kThreads, SPQT_MANY_ROWS ? 2 : SPQT_GS == 128 ? 3 : 4) SPQT_NAME(
    const SPQT_T* x, const uint32_t* w, const SPQT_T* scales, const SPQT_T* biases,
    const void* active, SPQT_T* y, float* partials, int* counters,
    int M, int N, int K, int x_stride, int kind, int n_host, int threshold_per_column,
    float t_value, int splits, const SPQT_T* norm, const SPQT_T* residual, int r_stride, int prologue, float eps) {
  static_assert(SPQT_BITS == 4, "the tensor-core kernel reads 4-bit codes");
  constexpr int kRows = SPQT_MANY_ROWS ? spqt::tensor_core_rows(sizeof(SPQT_T)) : 1;
  spqt::mma4::zigzag_gemv<SPQT_T, SPQT_GS, kRows>(
      x, w, scales, biases, active, y, partials, counters,
      M, N, K, x_stride, kind, n_host, threshold_per_column, t_value, splits, norm, residual, r_stride, prologue, eps);
}
#endif
