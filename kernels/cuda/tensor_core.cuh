// The tensor-core formulation of a zigzag GEMV, shared by zigzag_gemv_mma.cu (every kind of active
// set) and zigzag_gemv_bulk.cu (dense walks fed by bulk copies): how a tile of 16 columns of one band
// becomes four (or eight) mma.sync, and how their accumulators become the band's rows.
//
// For one band and 16 columns, D (16x8) = A (16x16) B (16x8) with
//   A[m][k] = 128 + q(band, column k, row of m)   (exact integers in bf16)
//   B[k][n] = term n of x[k] * scale[band, k]
// x*scale is split into bf16 terms whose float32 sum is the product to 16 bits (fp16 and bf16
// inputs: two terms) or 24 bits (float32: three), so y = D[:, 0] + D[:, 1] (+ D[:, 2]) keeps
// float32 accuracy. The offset 128 is not subtracted per code: it adds 128 * sum_k B[k] to every
// row of the band, which is folded into the band's bias term together with x[k] * bias[band, k].
//
// Which lane holds what (mma.m16n8k16, g = lane / 4, t = lane % 4): in a tile, lane (g, t) reads
// the words of rows [g*R, g*R + R) (R = group_size / 8) of columns t, t+4, t+8, t+12 (MMA k = 2t,
// 2t+1, 2t+8, 2t+9: conflict-free shared-memory reads). MMA j takes byte j of those words: its
// even nibbles are row m = g, its odd nibbles row m = g + 8, i.e. band rows g*R + 2j and
// g*R + 2j + 1. One PRMT puts byte j of two columns' words side by side; one LOP3 makes a pair of
// codes a bf16x2 {128 + q0, 128 + q1}.
#pragma once

#include "zigzag.cuh"

namespace spqt::tc {

// Position p of a tile's entry -> its B slot: lane t's values (columns t, t+4, t+8, t+12) side by side.
__device__ __forceinline__ int term_slot(int p) {
  return (p & ~15) | ((p & 3) << 2) | ((p >> 2) & 3);
}

// The low nibbles of bytes 0 and 2 of p as bf16x2 {128 + q0, 128 + q2}: one LOP3, (p & m) | c
// (the compiler splits the expression in two when both constants are immediates).
__device__ __forceinline__ uint32_t codes_bf16x2(uint32_t p, uint32_t mask, uint32_t magic) {
  uint32_t v;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(v) : "r"(p), "r"(mask), "r"(magic));
  return v;
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The mask and magic constants of codes_bf16x2, kept in registers for the three-input LOP3.
struct Magic {
  uint32_t mask = 0x000F000Fu, magic = 0x43004300u;
  __device__ __forceinline__ Magic() { asm volatile("" : "+r"(mask), "+r"(magic)); }
};

// x' * scale of one entry as TERMS bf16 terms, written to terms[i][slot]; adds what the entry
// contributes to the band's bias term to `bias`: x' * bias minus 128 times the terms (the codes'
// offset).
template <int TERMS, int STRIDE>
__device__ __forceinline__ void stage_terms(float xv, float s, float b, uint16_t (*terms)[STRIDE], int slot,
                                            float& bias) {
  bias = fmaf(xv, b, bias);
  float rest = xv * s;
#pragma unroll
  for (int i = 0; i < TERMS; ++i) {
    const uint16_t h = __bfloat16_as_ushort(__float2bfloat16_rn(rest));
    terms[i][slot] = h;
    const float hv = __bfloat162float(__ushort_as_bfloat16(h));
    rest -= hv;
    bias = fmaf(-128.0f, hv, bias);
  }
}

// The MMAs of one tile of 16 columns in shared memory (`tile`: column c's group at c * GS / 2), with
// this lane's B fragment `b` (its slots 4t..4t+3 of the tile).
template <int GS>
__device__ __forceinline__ void mma_tile(float (&acc)[GS / 16][4], const uint8_t* tile, uint2 b, int g, int t,
                                         const Magic& k) {
  constexpr int kGroupBytes = GS / 2;
  constexpr int kWordsPerLane = GS / 64;
  uint32_t words[4][kWordsPerLane];
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const uint32_t* src = reinterpret_cast<const uint32_t*>(tile + (t + 4 * c) * kGroupBytes) + g * kWordsPerLane;
#pragma unroll
    for (int v = 0; v < kWordsPerLane; ++v) words[c][v] = src[v];
  }
#pragma unroll
  for (int j = 0; j < GS / 16; ++j) {
    const int wi = j / 4;
    const uint32_t sel = (j % 4) | ((4 + j % 4) << 8);  // byte j of the two words -> bytes 0, 2
    const uint32_t p01 = __byte_perm(words[0][wi], words[1][wi], sel);
    const uint32_t p23 = __byte_perm(words[2][wi], words[3][wi], sel);
    const uint32_t a[4] = {codes_bf16x2(p01, k.mask, k.magic), codes_bf16x2(p01 >> 4, k.mask, k.magic),
                           codes_bf16x2(p23, k.mask, k.magic), codes_bf16x2(p23 >> 4, k.mask, k.magic)};
    mma_bf16(acc[j], a, b.x, b.y);
  }
}

// Row r's part of the band: the sum of D's columns [r * TERMS, (r + 1) * TERMS), in that order, into
// `rows` (GS floats, this warp's). Lane (g, t) holds D[g][2t..2t+1] and D[g+8][2t..2t+1]: column c is
// element c % 2 of lane (g, c / 2). Every lane takes part (shuffles).
template <int GS, int TERMS>
__device__ __forceinline__ void store_rows(const float (&acc)[GS / 16][4], int r, float* rows, int lane) {
  constexpr int kRowsPerLane = GS / 8;
  const int g = lane >> 2;
#pragma unroll
  for (int j = 0; j < GS / 16; ++j) {
    float even = 0.0f, odd = 0.0f;
#pragma unroll
    for (int i = 0; i < TERMS; ++i) {
      const int c = r * TERMS + i;
      const int from = (lane & ~3) | (c >> 1);
      const float e = __shfl_sync(0xffffffffu, acc[j][c & 1], from);
      const float o = __shfl_sync(0xffffffffu, acc[j][2 + (c & 1)], from);
      even = i == 0 ? e : even + e;
      odd = i == 0 ? o : odd + o;
    }
    if ((lane & 3) == 0) {
      rows[g * kRowsPerLane + 2 * j] = even;
      rows[g * kRowsPerLane + 2 * j + 1] = odd;
    }
  }
}

} // namespace spqt::tc
