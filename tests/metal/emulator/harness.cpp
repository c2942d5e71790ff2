// Host side of the emulated Metal backend: encodes the kernels exactly as dispatch/metal.cpp does
// (same host names, arguments, grids and threadgroup sizes), on guarded buffers. Exposed to the
// Python tests through a C ABI.
//
// Every buffer has guard bands on both sides: NaN (or an in-range column for index lists) around the
// inputs, so a read out of bounds shows in the result, and a bit pattern around the outputs that must
// survive, so a write out of bounds is reported. Outputs and workspaces start out poisoned (NaN).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "../../../kernels/metal/kernel_names.h"
#include "../../../kernels/metal/params.h"
#include "simt.h"

namespace {

using namespace spqt::metal_params;
namespace names = spqt::metal_kernels;

constexpr size_t kGuard = 64;

template <typename T>
T poison() {
  T v;
  std::memset(&v, 0xff, sizeof(T)); // NaN for floats, -1 for integers
  return v;
}

template <typename T>
struct Guarded {
  std::vector<T> data;
  size_t size;
  T fill;
  Guarded(const void* src, size_t n, T guard) : data(n + 2 * kGuard, guard), size(n), fill(guard) {
    if (src && n) {
      std::memcpy(data.data() + kGuard, src, n * sizeof(T));
    }
  }
  T* ptr() {
    return data.data() + kGuard;
  }
  void check(const char* what) const {
    for (size_t i = 0; i < kGuard; ++i) {
      if (std::memcmp(&data[i], &fill, sizeof(T)) || std::memcmp(&data[kGuard + size + i], &fill, sizeof(T))) {
        throw std::runtime_error(std::string("write out of bounds of ") + what);
      }
    }
  }
  void copy_to(void* dst) const {
    std::memcpy(dst, data.data() + kGuard, size * sizeof(T));
  }
};

// Signatures of the kernels, as the Metal host binds them (buffers, then scalars, then built-ins).
template <typename T>
using GemvKernel = void (*)(const T*, const uint32_t*, const T*, const T*, const int32_t*, T*, float*,
                            const int&, const int&, const int&, uint3, uint3, uint, uint, uint);
template <typename T>
using ReduceKernel = void (*)(const float*, T*, const int&, const int&, const int&, uint);
template <typename T>
using CollectKernel = void (*)(const T*, const float*, int32_t*, const int&, const int&, uint, uint, uint, uint, uint);
template <typename T>
using CopyKernel = void (*)(const T*, T*, const int*, const int64_t*, const int&, const int64_t&, uint);

template <typename T>
void encode_collect(const std::string& type, const T* x, const float* t, int t_stride, int K, int threads,
                    int32_t* out, uint64_t seed) {
  auto fn = simt::kernel<CollectKernel<T>>(names::collect_active(type));
  if (threads <= 0) {
    threads = std::min(kCollectMaxThreads, (K + kSimdSize - 1) / kSimdSize * kSimdSize);
  }
  simt::launch({1, 1, 1}, uint(threads), seed, [&](const simt::ThreadIds& id) {
    fn(x, t, out, K, t_stride, id.tid, id.threads, id.sg, id.simdgroups, id.lane);
  });
}

struct GemvArgs {
  int bits, gs, kind;
  const void *x, *scales, *biases, *active;
  const uint32_t* w;
  int active_len;
  void* y;
  int M, N, K, splits;
  uint64_t seed;
};

template <typename T>
void gemv(const std::string& type, const GemvArgs& a) {
  const int bands = a.N / a.gs;
  const int words = a.gs * a.bits / 32;
  const T nan = T(NAN);
  Guarded<T> x(a.x, size_t(a.M) * a.K, nan);
  Guarded<uint32_t> w(a.w, size_t(bands) * a.K * words, 0xffffffffu);
  Guarded<T> scales(a.scales, size_t(bands) * a.K, nan);
  Guarded<T> biases(a.biases, size_t(bands) * a.K, nan);

  // The active list. Index lists are guarded by column 0, so reading past their end changes y.
  const bool sparse = a.kind != 0;
  int listed = 0;
  Guarded<int32_t> list(nullptr, 0, 0);
  if (a.kind == 1) {
    list = Guarded<int32_t>(a.active, a.active_len, 0);
    listed = a.active_len;
  } else if (a.kind == 2) {
    list = Guarded<int32_t>(a.active, a.K + 1, 0);
    listed = -1;
  } else if (a.kind == 3) {
    // Threshold: collect into a temporary packed list on the device, then walk it.
    Guarded<float> t(a.active, a.active_len, NAN);
    Guarded<int32_t> collected(nullptr, a.K + 1, poison<int32_t>());
    encode_collect<T>(type, x.ptr(), t.ptr(), a.active_len == 1 ? 0 : 1, a.K, 0, collected.ptr(), a.seed);
    collected.check("the collected list");
    list = Guarded<int32_t>(collected.ptr(), a.K + 1, 0);
    listed = -1;
  }

  const int max_entries = a.kind == 1 ? a.active_len : a.K;
  const int splits = a.splits > 0 ? a.splits : gemv_splits(max_entries);
  Guarded<T> y(nullptr, size_t(a.M) * a.N, poison<T>());
  Guarded<float> partials(nullptr, splits > 1 ? size_t(a.M) * splits * a.N : 0, poison<float>());

  auto fn = simt::kernel<GemvKernel<T>>(names::zigzag_gemv(sparse, type, a.bits, a.gs));
  const int32_t* active = sparse ? list.ptr() : nullptr; // the dense walk never reads it
  simt::launch({uint(bands), uint(splits), uint(a.M)}, kGemvThreads, a.seed, [&](const simt::ThreadIds& id) {
    fn(x.ptr(), w.ptr(), scales.ptr(), biases.ptr(), active, y.ptr(), partials.ptr(), a.K, a.N, listed,
       id.tg, id.tgs, id.tid, id.sg, id.lane);
  });
  if (splits > 1) {
    partials.check("the per-split partials");
    auto reduce = simt::kernel<ReduceKernel<T>>(names::zigzag_gemv_reduce(type));
    const int size = a.M * a.N;
    const uint groups = uint((size + kElementwiseThreads - 1) / kElementwiseThreads);
    simt::launch({groups, 1, 1}, kElementwiseThreads, a.seed, [&](const simt::ThreadIds& id) {
      reduce(partials.ptr(), y.ptr(), a.N, splits, size, id.gid);
    });
  }
  y.check("y");
  y.copy_to(a.y);
}

int report(const std::exception& e, char* err, int err_len) {
  std::snprintf(err, size_t(err_len), "%s", e.what());
  return 1;
}

template <typename F>
int with_type(const std::string& type, F&& f) {
  if (type == "float32") {
    f.template operator()<float>();
  } else if (type == "float16") {
    f.template operator()<half>();
  } else if (type == "bfloat16") {
    f.template operator()<bfloat>();
  } else {
    throw std::runtime_error("unknown type " + type);
  }
  return 0;
}

} // namespace

extern "C" {

// kind: 0 dense, 1 index list (active: int32[active_len]), 2 packed list (active: int32[K + 1]),
// 3 threshold (active: float32[active_len], 1 or K). splits <= 0 uses the host's policy.
int spqt_emu_zigzag_gemv(const char* type, int bits, int group_size, int kind, const void* x, const uint32_t* w,
                         const void* scales, const void* biases, const void* active, int active_len, void* y,
                         int M, int N, int K, int splits, uint64_t seed, char* err, int err_len) {
  try {
    GemvArgs a{bits, group_size, kind, x, scales, biases, active, w, active_len, y, M, N, K, splits, seed};
    return with_type(type, [&]<typename T>() { gemv<T>(type, a); });
  } catch (const std::exception& e) {
    return report(e, err, err_len);
  }
}

// threads <= 0 uses the host's policy.
int spqt_emu_collect_active(const char* type, const void* x, const float* threshold, int t_len, int K,
                            int threads, uint64_t seed, int32_t* out, char* err, int err_len) {
  try {
    return with_type(type, [&]<typename T>() {
      Guarded<T> xg(x, K, T(NAN));
      Guarded<float> t(threshold, t_len, NAN);
      Guarded<int32_t> o(nullptr, K + 1, poison<int32_t>());
      encode_collect<T>(type, xg.ptr(), t.ptr(), t_len == 1 ? 0 : 1, K, threads, o.ptr(), seed);
      o.check("the collected list");
      o.copy_to(out);
    });
  } catch (const std::exception& e) {
    return report(e, err, err_len);
  }
}

// Copies the strided view (first element at src[offset], shape, element strides, possibly negative)
// of src into the row-contiguous dst.
int spqt_emu_copy_to_contiguous(int itemsize, const void* src, int64_t src_len, int64_t offset, const int* shape,
                                const int64_t* strides, int ndim, void* dst, uint64_t seed, char* err,
                                int err_len) {
  try {
    auto run = [&]<typename T>() {
      int64_t size = 1;
      for (int d = 0; d < ndim; ++d) {
        size *= shape[d];
      }
      Guarded<T> s(src, size_t(src_len), poison<T>());
      Guarded<T> d(nullptr, size_t(size), T(0x5a5a));
      auto fn = simt::kernel<CopyKernel<T>>(names::copy_to_contiguous(int(sizeof(T))));
      const uint groups = uint((size + kElementwiseThreads - 1) / kElementwiseThreads);
      simt::launch({groups, 1, 1}, kElementwiseThreads, seed, [&](const simt::ThreadIds& id) {
        fn(s.ptr() + offset, d.ptr(), shape, strides, ndim, size, id.gid);
      });
      d.check("the copy");
      d.copy_to(dst);
    };
    if (itemsize == 2) {
      run.operator()<uint16_t>();
    } else if (itemsize == 4) {
      run.operator()<uint32_t>();
    } else {
      throw std::runtime_error("unsupported item size");
    }
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, err_len);
  }
}

} // extern "C"

extern "C" {

// Runs one of the emulator's self-check kernels (selfcheck.metal) on one threadgroup.
int spqt_emu_selfcheck(const char* name, int threads, uint64_t seed, float* out, int out_len, char* err,
                       int err_len) {
  try {
    using Kernel = void (*)(float*, uint, uint, uint);
    auto fn = simt::kernel<Kernel>(name);
    Guarded<float> o(nullptr, size_t(out_len), poison<float>());
    simt::launch({1, 1, 1}, uint(threads), seed, [&](const simt::ThreadIds& id) {
      fn(o.ptr(), id.tid, id.threads, id.lane);
    });
    o.check("out");
    o.copy_to(out);
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, err_len);
  }
}

} // extern "C"
