// CPU reference kernels for the zigzag format (docs/format.md). They define the semantics the GPU
// kernels are checked against: float32 accumulation, bias hoisted per band, entries outside [0, K)
// skipped. Templated on activation type, bits and group size so the inner loops vectorize.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../contract.h"

namespace spqt::cpu {

// Unpacks the gs codes of one group (an LSB-first bitstream of gs*bits bits) into floats.
template <int BITS, int GS>
inline void unpack_group(const uint32_t* words, float* q) {
  constexpr uint32_t mask = (1u << BITS) - 1;
  if constexpr (32 % BITS == 0) {
    constexpr int per_word = 32 / BITS;
    for (int w = 0; w < GS / per_word; ++w) {
      const uint32_t v = words[w];
      for (int i = 0; i < per_word; ++i) {
        q[w * per_word + i] = float((v >> (i * BITS)) & mask);
      }
    }
  } else {
    // 3, 5 and 6 bits: a code may straddle two words.
    for (int r = 0; r < GS; ++r) {
      const int bit = r * BITS;
      const int word = bit / 32;
      const int shift = bit % 32;
      uint64_t v = words[word];
      if (shift + BITS > 32) {
        v |= uint64_t(words[word + 1]) << 32;
      }
      q[r] = float((v >> shift) & mask);
    }
  }
}

// x' (M, K) of a fused product: computed in float32 and rounded to T. RMSNorm rounds as MLX's
// rms_norm does (x * rsqrt(mean(x^2) + eps) to T, then times the weight, to T); SwiGLU rounds once,
// where mlx-lm's swiglu rounds each of its three ops, so the two can differ in the last bit. x holds M
// rows of K columns, or of 2K for SwiGLU (gate, then up).
template <typename T>
void prologue(const T* x, Prologue kind, const T* norm_weight, float eps, int M, int K, T* out) {
  const int width = kind == Prologue::SwiGLU ? 2 * K : K;
  for (int m = 0; m < M; ++m) {
    const T* xm = x + int64_t(m) * width;
    T* om = out + int64_t(m) * K;
    if (kind == Prologue::RmsNorm) {
      float squares = 0.0f;
      for (int k = 0; k < K; ++k) {
        squares += float(xm[k]) * float(xm[k]);
      }
      const float inv_rms = 1.0f / std::sqrt(squares / float(K) + eps);
      for (int k = 0; k < K; ++k) {
        om[k] = T(float(T(float(xm[k]) * inv_rms)) * float(norm_weight[k]));
      }
    } else if (kind == Prologue::SwiGLU) {
      for (int k = 0; k < K; ++k) {
        const float g = float(xm[k]);
        om[k] = T(g / (1.0f + std::exp(-g)) * float(xm[K + k]));
      }
    } else {
      std::copy(xm, xm + K, om);
    }
  }
}

// y (M, N) = residual + x (M, K) @ W.T over the active columns. cols == nullptr means every column
// (n == K); residual may be nullptr.
template <typename T, int BITS, int GS>
void zigzag_gemv(
    const T* x,
    const uint32_t* w,
    const T* scales,
    const T* biases,
    const int32_t* cols,
    int64_t n,
    T* y,
    int M,
    int N,
    int K,
    const T* residual = nullptr) {
  constexpr int words_per_group = GS * BITS / 32;
  const int bands = N / GS;
  std::vector<float> acc(size_t(M) * GS);
  std::vector<float> bias_sum(M);
  float q[GS];
  for (int b = 0; b < bands; ++b) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(bias_sum.begin(), bias_sum.end(), 0.0f);
    const uint32_t* wb = w + int64_t(b) * K * words_per_group;
    const T* sb = scales + int64_t(b) * K;
    const T* bb = biases + int64_t(b) * K;
    for (int64_t p = 0; p < n; ++p) {
      const int64_t k = cols ? int64_t(cols[p]) : p;
      if (k < 0 || k >= K) {
        continue;
      }
      unpack_group<BITS, GS>(wb + k * words_per_group, q);
      const float s = float(sb[k]);
      const float bias = float(bb[k]);
      for (int m = 0; m < M; ++m) {
        const float xv = float(x[int64_t(m) * K + k]);
        const float xs = xv * s;
        float* a = acc.data() + size_t(m) * GS;
        for (int r = 0; r < GS; ++r) {
          a[r] += xs * q[r];
        }
        bias_sum[m] += xv * bias;
      }
    }
    for (int m = 0; m < M; ++m) {
      const int64_t at = int64_t(m) * N + int64_t(b) * GS;
      const float* a = acc.data() + size_t(m) * GS;
      for (int r = 0; r < GS; ++r) {
        y[at + r] = T(a[r] + bias_sum[m] + (residual ? float(residual[at + r]) : 0.0f));
      }
    }
  }
}

// out (K + 1,) = [n, ascending k with |x[k]| > t[k]]; the unused tail is filled with -1.
// t_stride is 0 for a scalar threshold, 1 for one threshold per column.
template <typename T>
void collect_active(const T* x, const float* t, int t_stride, int K, int32_t* out) {
  int32_t n = 0;
  for (int k = 0; k < K; ++k) {
    if (std::abs(float(x[k])) > t[int64_t(k) * t_stride]) {
      out[1 + n++] = k;
    }
  }
  out[0] = n;
  for (int p = n + 1; p <= K; ++p) {
    out[p] = -1;
  }
}

// The Threshold kind over M rows of x (M, K): every row keeps its entries with |x| > t[k] and the
// others become 0, in place; out (K + 1,) gets the union of the rows' active columns, as
// collect_active writes one row's. A product over that list then gives each row its own active
// set's result.
template <typename T>
void threshold_rows(T* x, const float* t, int t_stride, int M, int K, int32_t* out) {
  std::vector<char> any(K, 0);
  for (int m = 0; m < M; ++m) {
    T* xm = x + int64_t(m) * K;
    for (int k = 0; k < K; ++k) {
      if (std::abs(float(xm[k])) > t[int64_t(k) * t_stride]) {
        any[k] = 1;
      } else {
        xm[k] = T(0.0f);
      }
    }
  }
  int32_t n = 0;
  for (int k = 0; k < K; ++k) {
    if (any[k]) {
      out[1 + n++] = k;
    }
  }
  out[0] = n;
  std::fill(out + 1 + n, out + 1 + K, -1);
}

} // namespace spqt::cpu
