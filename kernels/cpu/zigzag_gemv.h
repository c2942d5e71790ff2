// CPU reference kernels for the zigzag format (docs/format.md). They define the semantics the GPU
// kernels are checked against: float32 accumulation, bias hoisted per band, entries outside [0, K)
// skipped. Templated on activation type, bits and group size so the inner loops vectorize.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

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

// y (M, N) = x (M, K) @ W.T over the active columns. cols == nullptr means every column (n == K).
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
    int K) {
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
      T* yb = y + int64_t(m) * N + int64_t(b) * GS;
      const float* a = acc.data() + size_t(m) * GS;
      for (int r = 0; r < GS; ++r) {
        yb[r] = T(a[r] + bias_sum[m]);
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

} // namespace spqt::cpu
