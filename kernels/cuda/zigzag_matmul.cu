// Zigzag matmul on the tensor cores: y = x @ W.T for many rows of x (prefill), read straight from the
// zigzag layout (docs/format.md). No dequantized copy of W is written to global memory: each block
// dequantizes the tile it multiplies into shared memory, so the weight's bytes are what is read.
//
// Tiles. A block computes kBM rows of x by kBN output columns (kBN / group_size bands) and walks K
// kBK columns at a step. In a step every thread loads the 32 codes of one column and a quarter of
// the tile's rows, with their group's scale and bias, plus 16 bytes of x twice. The codes are
// dequantized (scale * q + bias with one rounding to T, as mx.dequantize writes them; 2-, 4- and
// 8-bit codes two at a time in T pairs, see Pairs) into shared memory in the order the zigzag
// layout stores them: a column's rows side by side, i.e. W^T row-major. The next step's loads are issued before this step's MMAs, so their latency hides
// behind tensor-core work.
//
// MMAs. mma.m16n8k16 with A = a 16x16 tile of x (ldmatrix) and B = 16 columns by 8 output rows of
// W^T (ldmatrix.trans: the mma reads B as pairs along k, the tile holds pairs along n), float32
// accumulators, each block summing K in one fixed order: every output bit is reproducible. Blocks
// run the rows of x fastest, so the blocks that share a weight tile run together and the tile comes
// from memory once; x is small enough to stay in L2.
//
// Rows, columns and K need not be multiples of the tile. x is row-contiguous; it is read 16 bytes at
// a time where its rows allow (K a multiple of 8, 16-byte aligned), element by element otherwise.
//
// Instantiated by the build with SPQT_NAME, SPQT_T (__half or __nv_bfloat16), SPQT_BITS, SPQT_GS.
#include "zigzag.cuh"

namespace spqt {

namespace matmul {

constexpr int kBM = kMatmulTileRows;     // rows of x per block
constexpr int kBN = kMatmulTileColumns;  // output columns per block
constexpr int kBK = 64;                  // columns of x per step
// Shared rows padded by 16 bytes: the 8 rows an ldmatrix reads then fall in distinct banks.
constexpr int kPad = 8;
constexpr int kCodes = 32;  // codes a thread dequantizes per step
static_assert(kBK * kBN / kCodes == kThreads, "a step gives every thread one column's 32 codes");
constexpr int kXLoads = kBM * kBK / 8 / kThreads;  // 16-byte loads of x per thread and step

template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(
    float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 matrices of 16-bit values from shared memory; lane l gives the address of row l % 8 of
// matrix l / 8. With .trans each lane receives a column pair instead of a row pair.
__device__ __forceinline__ void load_matrices(uint32_t (&r)[4], const void* p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void load_matrices_transposed(uint32_t (&r)[4], const void* p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// Two floats as a T pair in one register, lo in the low half (the lower address).
template <typename T>
__device__ __forceinline__ uint32_t pack(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Codes as T pairs, two per three instructions: `pair` holds codes q and q' in its two 16-bit halves;
// OR-ing in the exponent of a power of two 2^e (1024 for half, 128 for bfloat16) makes them the
// values 2^e + q and 2^e + q' (exact while q < 2^e, and for bfloat16 below 2^8), subtracting 2^e
// is exact, and a fused multiply-add applies scale and bias with one rounding.
template <typename T>
struct Pairs;

template <>
struct Pairs<__half> {
  static constexpr int kMaxBits = 8;
  using T2 = __half2;
  static __device__ __forceinline__ T2 both(__half v) { return __half2half2(v); }
  static __device__ __forceinline__ uint32_t dequantize(uint32_t pair, T2 scale, T2 bias) {
    const uint32_t v = pair | 0x64006400u;  // 1024 + q
    const T2 q = __hsub2(*reinterpret_cast<const T2*>(&v), __float2half2_rn(1024.0f));
    const T2 r = __hfma2(q, scale, bias);
    return *reinterpret_cast<const uint32_t*>(&r);
  }
};

template <>
struct Pairs<__nv_bfloat16> {
  static constexpr int kMaxBits = 7;
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ T2 both(__nv_bfloat16 v) { return __bfloat162bfloat162(v); }
  static __device__ __forceinline__ uint32_t dequantize(uint32_t pair, T2 scale, T2 bias) {
    const uint32_t v = pair | 0x43004300u;  // 128 + q
    const T2 q = __hsub2(*reinterpret_cast<const T2*>(&v), __float2bfloat162_rn(128.0f));
    const T2 r = __hfma2(q, scale, bias);
    return *reinterpret_cast<const uint32_t*>(&r);
  }
};

// Whether BITS-bit codes are dequantized in pairs: codes that fill whole words, within the
// magic number's exact range. A word's C = 32 / BITS codes are then stored in the order
// q_0, q_{C/2}, q_1, q_{C/2+1}, ...: one shift and mask take codes j and j + C/2 together.
template <typename T, int BITS>
constexpr bool kInPairs = (BITS == 2 || BITS == 4 || BITS == 8) && BITS <= Pairs<T>::kMaxBits;

// The output row (within the tile) of shared column c, for the order above.
template <typename T, int BITS>
__device__ __forceinline__ int tile_row(int c) {
  if constexpr (kInPairs<T, BITS>) {
    constexpr int C = 32 / BITS;
    const int p = c % C;
    return c - p + p / 2 + (p & 1) * (C / 2);
  } else {
    return c;
  }
}

template <typename T, int BITS, int GS>
__device__ __forceinline__ void zigzag_matmul(
    const T* __restrict__ x,
    const uint32_t* __restrict__ w,
    const T* __restrict__ scales,
    const T* __restrict__ biases,
    T* __restrict__ y,
    int M, int N, int K) {
  constexpr int kGroupWords = GS * BITS / 32;
  __shared__ __align__(16) T wt[kBK][kBN + kPad];  // W^T: [column][output row]
  __shared__ __align__(16) T xs[kBM][kBK + kPad];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int m0 = blockIdx.x * kBM;
  const int n0 = blockIdx.y * kBN;

  // This thread's codes: column `col` of the step, rows [row, row + 32) of the tile.
  const int col = tid / (kBN / kCodes);
  const int row = (tid % (kBN / kCodes)) * kCodes;
  const int band = (n0 + row) / GS;
  const bool in_band = n0 + row < N;  // N is a multiple of GS, and GS of 32
  const int64_t group = int64_t(in_band ? band : 0) * K + col;
  const uint32_t* w_col = w + group * kGroupWords + (row % GS) * BITS / 32;
  const T* scale_col = scales + group;
  const T* bias_col = biases + group;

  // 16-byte loads of x where every row starts on 16 bytes; element by element otherwise.
  const bool whole_loads = K % 8 == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0;

  uint32_t codes[BITS];
  T scale = from_float<T>(0.0f);
  T bias = from_float<T>(0.0f);
  uint4 xv[kXLoads];

  const auto load = [&](int k0) {
    if (in_band && k0 + col < K) {
      load_chunk<BITS, /* streaming = */ false>(w_col + int64_t(k0) * kGroupWords, codes);
      scale = scale_col[k0];
      bias = bias_col[k0];
    } else {
#pragma unroll
      for (int i = 0; i < BITS; ++i) codes[i] = 0;
      scale = bias = from_float<T>(0.0f);
    }
#pragma unroll
    for (int i = 0; i < kXLoads; ++i) {
      const int j = tid + i * kThreads;
      const int m = m0 + j / (kBK / 8);
      const int k = k0 + (j % (kBK / 8)) * 8;
      const T* p = x + int64_t(m) * K + k;
      if (whole_loads) {
        xv[i] = m < M && k < K ? *reinterpret_cast<const uint4*>(p) : make_uint4(0, 0, 0, 0);
      } else {
        uint32_t v[4];
#pragma unroll
        for (int e = 0; e < 8; e += 2) {
          const bool lo = m < M && k + e < K;
          const bool hi = m < M && k + e + 1 < K;
          v[e / 2] = pack<T>(lo ? to_float(p[e]) : 0.0f, hi ? to_float(p[e + 1]) : 0.0f);
        }
        xv[i] = make_uint4(v[0], v[1], v[2], v[3]);
      }
    }
  };
  const auto store = [&]() {
    uint32_t v[kCodes / 2];
    if constexpr (kInPairs<T, BITS>) {
      constexpr int kPairsPerWord = 16 / BITS;
      constexpr uint32_t kMask = ((1u << BITS) - 1) * 0x00010001u;
      const auto scale2 = Pairs<T>::both(scale);
      const auto bias2 = Pairs<T>::both(bias);
#pragma unroll
      for (int i = 0; i < BITS; ++i) {
#pragma unroll
        for (int j = 0; j < kPairsPerWord; ++j) {
          v[i * kPairsPerWord + j] = Pairs<T>::dequantize((codes[i] >> (j * BITS)) & kMask, scale2, bias2);
        }
      }
    } else {
      const float s = to_float(scale);
      const float b = to_float(bias);
#pragma unroll
      for (int r = 0; r < kCodes / 2; ++r) {
        v[r] = pack<T>(fmaf(s, code<BITS>(codes, 2 * r), b), fmaf(s, code<BITS>(codes, 2 * r + 1), b));
      }
    }
    uint4* dst = reinterpret_cast<uint4*>(&wt[col][row]);
#pragma unroll
    for (int q = 0; q < kCodes / 8; ++q) dst[q] = make_uint4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
#pragma unroll
    for (int i = 0; i < kXLoads; ++i) {
      const int j = tid + i * kThreads;
      *reinterpret_cast<uint4*>(&xs[j / (kBK / 8)][(j % (kBK / 8)) * 8]) = xv[i];
    }
  };

  // The warp's 32x32 share of the tile: rows wm.., output columns wn..
  const int wm = (warp & 1) * 32;
  const int wn = (warp >> 1) * 32;
  float acc[2][4][4] = {};

  load(0);
  store();
  __syncthreads();
  for (int k0 = 0; k0 < K; k0 += kBK) {
    const bool more = k0 + kBK < K;
    if (more) {
      load(k0 + kBK);
    }
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t a[2][4];
      uint32_t b[2][4];  // b[j]: output columns wn + 16j.. as {b0, b1} of two n8 tiles
#pragma unroll
      for (int i = 0; i < 2; ++i) load_matrices(a[i], &xs[wm + 16 * i + (lane & 15)][kk + (lane >> 4) * 8]);
#pragma unroll
      for (int j = 0; j < 2; ++j) load_matrices_transposed(b[j], &wt[kk + (lane & 15)][wn + 16 * j + (lane >> 4) * 8]);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int n = 0; n < 4; ++n) mma<T>(acc[i][n], a[i], b[n >> 1][2 * (n & 1)], b[n >> 1][2 * (n & 1) + 1]);
      }
    }
    __syncthreads();
    if (more) {
      store();
      __syncthreads();
    }
  }

  // Lane (g, t) holds rows g and g + 8 of each 16x8 tile, shared columns 2t and 2t + 1.
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      const int c = wn + 8 * n + 2 * t;
      const int c0 = n0 + tile_row<T, BITS>(c);
      const int c1 = n0 + tile_row<T, BITS>(c + 1);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + wm + 16 * i + g + 8 * h;
        if (m >= M || c0 >= N) {  // c0 and c1 lie in one chunk of 32 rows: both in or both out
          continue;
        }
        T* ym = y + int64_t(m) * N;
        if (c1 == c0 + 1) {
          *reinterpret_cast<uint32_t*>(ym + c0) = pack<T>(acc[i][n][2 * h], acc[i][n][2 * h + 1]);
        } else {
          ym[c0] = from_float<T>(acc[i][n][2 * h]);
          ym[c1] = from_float<T>(acc[i][n][2 * h + 1]);
        }
      }
    }
  }
}

} // namespace matmul

} // namespace spqt

#ifdef SPQT_NAME
extern "C" __global__ void __launch_bounds__(spqt::kThreads, 2) SPQT_NAME(
    const SPQT_T* x, const uint32_t* w, const SPQT_T* scales, const SPQT_T* biases, SPQT_T* y, int M, int N, int K) {
  spqt::matmul::zigzag_matmul<SPQT_T, SPQT_BITS, SPQT_GS>(x, w, scales, biases, y, M, N, K);
}
#endif
