// Host side of the emulated Metal backend. The encoding is dispatch/metal_encoding.h, the code
// dispatch/metal.cpp runs on a Mac; here it drives a fake encoder that records every dispatch and
// runs it on the SIMT emulator with the buffers and constants bound to each slot, passed to the
// kernel in the order of its [[buffer(i)]] parameters. A wrong slot, size or split in the shared
// encoding therefore changes what the kernels compute, and the tests see it. Exposed to the Python
// tests through a C ABI.
//
// Every buffer has guard bands on both sides: NaN (or an in-range column for index lists) around the
// inputs, so a read out of bounds shows in the result, and a bit pattern around the outputs and
// workspaces that must survive, so a write out of bounds is reported. Outputs and workspaces start
// out poisoned (NaN, -1).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include "metal_encoding.h" // dispatch/metal_encoding.h, or a variant of it (see metal_emulator.build)
#include "simt.h"

namespace {

using namespace spqt::metal_params;
using spqt::metal::Element;
using spqt::metal::Size3;

constexpr size_t kGuard = 64;
// What Apple GPUs allow per threadgroup; the fake reports it as every pipeline's limit.
constexpr int kMaxThreadsPerThreadgroup = 1024;

template <typename T>
T poison() {
  T v;
  std::memset(&v, 0xff, sizeof(T)); // NaN for floats, -1 for integers
  return v;
}

// Element types of buffers, so that a buffer bound where a kernel expects another type is reported.
enum class Tag { F32, F16, BF16, U16, U32, I32 };

template <typename T>
constexpr Tag tag_of() {
  if constexpr (std::is_same_v<T, float>) {
    return Tag::F32;
  } else if constexpr (std::is_same_v<T, half>) {
    return Tag::F16;
  } else if constexpr (std::is_same_v<T, bfloat>) {
    return Tag::BF16;
  } else if constexpr (std::is_same_v<T, uint16_t>) {
    return Tag::U16;
  } else if constexpr (std::is_same_v<T, uint32_t>) {
    return Tag::U32;
  } else {
    static_assert(std::is_same_v<T, int32_t>);
    return Tag::I32;
  }
}

const char* tag_name(Tag t) {
  static const char* names[] = {"float32", "float16", "bfloat16", "uint16", "uint32", "int32"};
  return names[int(t)];
}

struct GuardedBase {
  virtual ~GuardedBase() = default;
  virtual void check(const std::string& what) const = 0;
};

template <typename T>
struct Guarded : GuardedBase {
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
  void check(const std::string& what) const override {
    for (size_t i = 0; i < kGuard; ++i) {
      if (std::memcmp(&data[i], &fill, sizeof(T)) || std::memcmp(&data[kGuard + size + i], &fill, sizeof(T))) {
        throw std::runtime_error("write out of bounds of " + what);
      }
    }
  }
  void copy_to(void* dst) const {
    std::memcpy(dst, data.data() + kGuard, size * sizeof(T));
  }
};

// A buffer handle as the shared encoding sees it.
struct Buf {
  void* ptr = nullptr;
  Tag tag = Tag::F32;
};

template <typename T>
Buf buf(Guarded<T>& g) {
  return {g.ptr(), tag_of<T>()};
}

// Kernel signatures (buffers, then constants, then built-ins), as the .metal sources declare them.
template <typename T>
using GemvKernel = void (*)(const T*, const uint32_t*, const T*, const T*, const int32_t*, T*, float*,
                            const int&, const int&, const int&, const T*, const T*, const int&, const float&,
                            const int&, const float*, const int&, const uint32_t*, const int&, const int&,
                            const int&, const uint32_t*, const T*, const T*, const int&, uint3, uint3, uint, uint,
                            uint);
template <typename T>
using ReduceKernel = void (*)(const float*, T*, const int&, const int&, const int&, const T*, const int&, uint);
template <typename T>
using CollectKernel = void (*)(const T*, const float*, int32_t*, const int&, const int&, const T*, const int&,
                               const float&, const int&, uint, uint, uint, uint, uint);
template <typename T>
using CopyKernel = void (*)(const T*, T*, const int*, const int64_t*, const int&, const int64_t&, uint);

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
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

// The encoder of dispatch/metal_encoding.h for the emulator: records the bindings of each dispatch
// and runs it, taking every kernel argument from the slot it was bound to.
class FakeEncoder {
 public:
  using Buffer = Buf;

  explicit FakeEncoder(uint64_t seed) : seed_(seed) {}

  Buffer temporary(int64_t elements, Element type) {
    if (elements <= 0) {
      throw std::runtime_error("a workspace of " + std::to_string(elements) + " elements");
    }
    if (type == Element::Float32) {
      auto g = std::make_unique<Guarded<float>>(nullptr, size_t(elements), poison<float>());
      Buf b = buf(*g);
      workspaces_.push_back(std::move(g));
      return b;
    }
    auto g = std::make_unique<Guarded<int32_t>>(nullptr, size_t(elements), poison<int32_t>());
    Buf b = buf(*g);
    workspaces_.push_back(std::move(g));
    return b;
  }

  void set_kernel(const std::string& name) {
    kernel_ = name;
    slots_.clear();
  }

  int max_threads_per_threadgroup() {
    return kMaxThreadsPerThreadgroup;
  }

  void set_input(const Buffer& b, int slot) {
    bind(slot, Slot{Role::Input, b, {}});
  }
  void set_output(const Buffer& b, int slot) {
    bind(slot, Slot{Role::Output, b, {}});
  }
  void set_int(int32_t v, int slot) {
    bind(slot, Slot{Role::Bytes, {}, bytes(&v, sizeof(v))});
  }
  void set_int64(int64_t v, int slot) {
    bind(slot, Slot{Role::Bytes, {}, bytes(&v, sizeof(v))});
  }
  void set_ints(const std::vector<int32_t>& v, int slot) {
    bind(slot, Slot{Role::Bytes, {}, bytes(v.data(), v.size() * sizeof(int32_t))});
  }
  void set_int64s(const std::vector<int64_t>& v, int slot) {
    bind(slot, Slot{Role::Bytes, {}, bytes(v.data(), v.size() * sizeof(int64_t))});
  }
  void set_float(float v, int slot) {
    bind(slot, Slot{Role::Bytes, {}, bytes(&v, sizeof(v))});
  }

  void dispatch(Size3 groups, Size3 threads) {
    if (kernel_.empty()) {
      throw std::runtime_error("dispatch without a kernel");
    }
    if (threads.y != 1 || threads.z != 1 || threads.x < 1 || threads.x > kMaxThreadsPerThreadgroup) {
      throw std::runtime_error(kernel_ + ": threadgroup of " + std::to_string(threads.x) + "x" +
                               std::to_string(threads.y) + "x" + std::to_string(threads.z) + " threads");
    }
    if (groups.x < 1 || groups.y < 1 || groups.z < 1) {
      throw std::runtime_error(kernel_ + ": an empty grid");
    }
    log_ += kernel_ + " grid=" + std::to_string(groups.x) + "," + std::to_string(groups.y) + "," +
        std::to_string(groups.z) + " threads=" + std::to_string(threads.x) + "\n";
    used_.clear();
    run(uint3{uint(groups.x), uint(groups.y), uint(groups.z)}, uint(threads.x));
    for (const auto& [slot, _] : slots_) {
      if (!used_.count(slot)) {
        throw std::runtime_error(kernel_ + ": slot " + std::to_string(slot) + " is bound but the kernel has none");
      }
    }
    for (size_t i = 0; i < workspaces_.size(); ++i) {
      workspaces_[i]->check("workspace " + std::to_string(i));
    }
  }

  const std::string& log() const {
    return log_;
  }

 private:
  enum class Role { Input, Output, Bytes };
  struct Slot {
    Role role;
    Buf buffer;
    std::vector<unsigned char> data;
  };

  static std::vector<unsigned char> bytes(const void* p, size_t n) {
    auto c = static_cast<const unsigned char*>(p);
    return std::vector<unsigned char>(c, c + n);
  }

  void bind(int slot, Slot s) {
    if (kernel_.empty()) {
      throw std::runtime_error("binding slot " + std::to_string(slot) + " before choosing a kernel");
    }
    slots_[slot] = std::move(s);
  }

  const Slot& slot(int i, Role role) {
    auto it = slots_.find(i);
    if (it == slots_.end()) {
      throw std::runtime_error(kernel_ + ": nothing bound to slot " + std::to_string(i));
    }
    if (it->second.role != role) {
      static const char* names[] = {"an input buffer", "an output buffer", "constant bytes"};
      throw std::runtime_error(kernel_ + ": slot " + std::to_string(i) + " is bound as " +
                               names[int(it->second.role)] + ", the kernel takes " + names[int(role)]);
    }
    used_.insert(i);
    return it->second;
  }

  // Expert ids: int32 or uint32 (routers give either), which the kernel reads as unsigned.
  const uint32_t* ids(int i, bool any_type) {
    const Slot& s = slot(i, Role::Input);
    if (!any_type && s.buffer.tag != Tag::I32 && s.buffer.tag != Tag::U32) {
      throw std::runtime_error(kernel_ + ": slot " + std::to_string(i) + " holds " + tag_name(s.buffer.tag) +
                               ", the kernel reads int32 or uint32 ids");
    }
    return static_cast<const uint32_t*>(s.buffer.ptr);
  }

  // A buffer argument of element type T (`any_type`: a slot the kernel never reads).
  template <typename T>
  T* buffer(int i, Role role, bool any_type = false) {
    const Slot& s = slot(i, role);
    if (!any_type && s.buffer.tag != tag_of<T>()) {
      throw std::runtime_error(kernel_ + ": slot " + std::to_string(i) + " holds " + tag_name(s.buffer.tag) +
                               ", the kernel reads " + tag_name(tag_of<T>()));
    }
    return static_cast<T*>(s.buffer.ptr);
  }

  template <typename T>
  const T& constant(int i) {
    const Slot& s = slot(i, Role::Bytes);
    if (s.data.size() != sizeof(T)) {
      throw std::runtime_error(kernel_ + ": slot " + std::to_string(i) + " holds " + std::to_string(s.data.size()) +
                               " bytes, the kernel takes " + std::to_string(sizeof(T)));
    }
    return *reinterpret_cast<const T*>(s.data.data());
  }

  template <typename T>
  const T* constants(int i, size_t count) {
    const Slot& s = slot(i, Role::Bytes);
    if (s.data.size() != count * sizeof(T)) {
      throw std::runtime_error(kernel_ + ": slot " + std::to_string(i) + " holds " + std::to_string(s.data.size()) +
                               " bytes, the kernel reads " + std::to_string(count * sizeof(T)));
    }
    return reinterpret_cast<const T*>(s.data.data());
  }

  void run(uint3 grid, uint threads) {
    const std::string& k = kernel_;
    if (starts_with(k, "zigzag_gemv_reduce_")) {
      with_type(k.substr(19), [&]<typename T>() {
        auto fn = simt::kernel<ReduceKernel<T>>(k);
        const float* partials = buffer<float>(0, Role::Input);
        T* y = buffer<T>(1, Role::Output);
        const int& N = constant<int>(2);
        const int& splits = constant<int>(3);
        const int& size = constant<int>(4);
        const int& has_residual = constant<int>(6);
        const T* residual = buffer<T>(5, Role::Input, !has_residual);
        simt::launch(grid, threads, seed_, [&](const simt::ThreadIds& id) {
          fn(partials, y, N, splits, size, residual, has_residual, id.gid);
        });
      });
    } else if (starts_with(k, "zigzag_gemv_")) {
      const bool sparse = starts_with(k, "zigzag_gemv_sparse_");
      const std::string rest = k.substr(sparse ? 19 : 18);
      with_type(rest.substr(0, rest.find('_')), [&]<typename T>() {
        auto fn = simt::kernel<GemvKernel<T>>(k);
        const T* x = buffer<T>(0, Role::Input);
        const uint32_t* w = buffer<uint32_t>(1, Role::Input);
        const T* scales = buffer<T>(2, Role::Input);
        const T* biases = buffer<T>(3, Role::Input);
        const int& K = constant<int>(7);
        const int& N = constant<int>(8);
        const int& listed = constant<int>(9);
        // The dense walk and an empty list never read the list: any buffer may fill the slot.
        const int32_t* active = buffer<int32_t>(4, Role::Input, !sparse || listed == 0);
        T* y = buffer<T>(5, Role::Output);
        float* partials = buffer<float>(6, Role::Output, grid.y == 1); // unused with one split
        const int& prologue = constant<int>(12);
        const float& eps = constant<float>(13);
        const int& has_residual = constant<int>(14);
        const T* norm = buffer<T>(10, Role::Input, prologue != 1);   // read by the RMSNorm prologue only
        const T* residual = buffer<T>(11, Role::Input, !has_residual);
        const int& threshold_stride = constant<int>(16);
        const float* threshold = buffer<float>(15, Role::Input, threshold_stride < 0);  // rows that keep their own
        const int& x_div = constant<int>(18);
        const int& n_experts = constant<int>(19);
        const int& threshold_expert_stride = constant<int>(20);
        const uint32_t* experts = ids(17, n_experts < 0);  // gathered products only
        const int& bands_a = constant<int>(24);
        // The second set of weights, read by the bands from bands_a on (a single set binds itself again).
        const uint32_t* w2 = buffer<uint32_t>(21, Role::Input);
        const T* scales2 = buffer<T>(22, Role::Input);
        const T* biases2 = buffer<T>(23, Role::Input);
        simt::launch(grid, threads, seed_, [&](const simt::ThreadIds& id) {
          fn(x, w, scales, biases, sparse ? active : nullptr, y, partials, K, N, listed, norm, residual, prologue, eps,
             has_residual, threshold_stride < 0 ? nullptr : threshold, threshold_stride,
             n_experts < 0 ? nullptr : experts, x_div, n_experts, threshold_expert_stride, w2, scales2, biases2,
             bands_a, id.tg, id.tgs, id.tid, id.sg, id.lane);
        });
      });
    } else if (starts_with(k, "collect_active_")) {
      with_type(k.substr(15), [&]<typename T>() {
        auto fn = simt::kernel<CollectKernel<T>>(k);
        const T* x = buffer<T>(0, Role::Input);
        const float* t = buffer<float>(1, Role::Input);
        int32_t* out = buffer<int32_t>(2, Role::Output);
        const int& K = constant<int>(3);
        const int& t_stride = constant<int>(4);
        const int& prologue = constant<int>(6);
        const float& eps = constant<float>(7);
        const T* norm = buffer<T>(5, Role::Input, prologue != 1);
        const int& rows = constant<int>(8);
        if (grid.x != 1 || grid.y != 1 || grid.z != 1) {
          throw std::runtime_error(k + ": the collection runs as one threadgroup");
        }
        simt::launch(grid, threads, seed_, [&](const simt::ThreadIds& id) {
          fn(x, t, out, K, t_stride, norm, prologue, eps, rows, id.tid, id.threads, id.sg, id.simdgroups, id.lane);
        });
      });
    } else if (starts_with(k, "copy_to_contiguous_")) {
      auto copy = [&]<typename T>() {
        auto fn = simt::kernel<CopyKernel<T>>(k);
        const T* src = buffer<T>(0, Role::Input);
        T* dst = buffer<T>(1, Role::Output);
        const int& ndim = constant<int>(4);
        const int* shape = constants<int>(2, size_t(ndim));
        const int64_t* strides = constants<int64_t>(3, size_t(ndim));
        const int64_t& size = constant<int64_t>(5);
        simt::launch(grid, threads, seed_, [&](const simt::ThreadIds& id) {
          fn(src, dst, shape, strides, ndim, size, id.gid);
        });
      };
      if (k == "copy_to_contiguous_16") {
        copy.operator()<uint16_t>();
      } else if (k == "copy_to_contiguous_32") {
        copy.operator()<uint32_t>();
      } else {
        throw std::runtime_error("unknown kernel " + k);
      }
    } else {
      throw std::runtime_error("unknown kernel " + k);
    }
  }

  uint64_t seed_;
  std::string kernel_;
  std::map<int, Slot> slots_;
  std::set<int> used_;
  std::deque<std::unique_ptr<GuardedBase>> workspaces_;
  std::string log_;
};

// The dispatches of the last call, for the tests.
std::string last_log;

int report(const std::exception& e, char* err, int err_len) {
  std::snprintf(err, size_t(err_len), "%s", e.what());
  return 1;
}


// Encodes (runs) a GEMV, keeps its dispatch log (also when the encoding throws), checks the guarded
// output and copies it out.
template <typename T, typename G>
void encode_and_read(FakeEncoder& enc, const G& g, Guarded<T>& y, void* out) {
  try {
    spqt::metal::encode_gemv(enc, g);
  } catch (...) {
    last_log = enc.log();
    throw;
  }
  last_log = enc.log();
  y.check("y");
  y.copy_to(out);
}

struct GemvArgs {
  int bits, gs, kind;
  const void *x, *scales, *biases, *active;
  const uint32_t* w;
  int active_len;
  void* y;
  int M, N, K, splits;
  uint64_t seed;
  int prologue;             // kernels/contract.h's Prologue
  const void *norm, *residual;  // null when not fused
  float eps;
};

template <typename T>
void gemv(const std::string& type, const GemvArgs& a) {
  const int bands = a.N / a.gs;
  const int words = a.gs * a.bits / 32;
  const T nan = T(NAN);
  Guarded<T> x(a.x, size_t(a.M) * a.K * (a.prologue == 2 ? 2 : 1), nan);
  Guarded<T> norm(a.norm, a.norm ? size_t(a.K) : 0, nan);
  Guarded<T> residual(a.residual, a.residual ? size_t(a.M) * a.N : 0, nan);
  Guarded<uint32_t> w(a.w, size_t(bands) * a.K * words, 0xffffffffu);
  Guarded<T> scales(a.scales, size_t(bands) * a.K, nan);
  Guarded<T> biases(a.biases, size_t(bands) * a.K, nan);
  Guarded<T> y(nullptr, size_t(a.M) * a.N, poison<T>());
  // Index lists are guarded by column 0, so reading past their end changes y; thresholds by NaN.
  Guarded<int32_t> list(a.kind == 1 || a.kind == 2 ? a.active : nullptr,
                        a.kind == 1 ? size_t(a.active_len) : a.kind == 2 ? size_t(a.K) + 1 : 0, 0);
  Guarded<float> thresholds(a.kind == 3 ? a.active : nullptr, a.kind == 3 ? size_t(a.active_len) : 0, NAN);

  FakeEncoder enc(a.seed);
  spqt::metal::Gemv<Buf> g{
      .type = type,
      .bits = a.bits,
      .group_size = a.gs,
      .M = a.M,
      .N = a.N,
      .K = a.K,
      .kind = spqt::ActiveKind(a.kind),
      .x = buf(x),
      .w = buf(w),
      .scales = buf(scales),
      .biases = buf(biases),
      .y = buf(y),
      .active = std::nullopt,
      .active_len = 0,
      .splits = a.splits,
      .prologue = {spqt::Prologue(a.prologue), std::nullopt, a.eps},
  };
  if (a.norm) {
    g.prologue.norm = buf(norm);
  }
  if (a.residual) {
    g.residual = buf(residual);
  }
  if (a.kind == 1 || a.kind == 2) {
    g.active = buf(list);
    g.active_len = a.kind == 1 ? a.active_len : a.K + 1;
  } else if (a.kind == 3) {
    g.active = buf(thresholds);
    g.active_len = a.active_len;
  }
  encode_and_read(enc, g, y, a.y);
}

// The experts' product, as spqt_emu_zigzag_gather_gemv takes it (mirrored by metal_emulator.GatherArgs).
struct GatherArgs {
  const char* type;
  int bits, gs;
  int prologue;  // kernels/contract.h's Prologue: 0 or 2 (SwiGLU, x of 2K columns)
  const void* x;
  const uint32_t* w;
  const void *scales, *biases;
  int bands;                    // of the first set
  const uint32_t* w2;           // the second set (null: none), of `bands2` bands
  const void *scales2, *biases2;
  int bands2;
  const void* experts;          // M ids
  int ids_unsigned;             // uint32 rather than int32
  const float* threshold;       // null: dense
  int t_len;
  void* y;                      // (M, (bands + bands2) * gs)
  int rows_x, M, K, E, splits;
  uint64_t seed;
};

template <typename T>
void gather_gemv(const GatherArgs& a) {
  const int words = a.gs * a.bits / 32;
  const int N = (a.bands + a.bands2) * a.gs;
  const T nan = T(NAN);
  Guarded<T> x(a.x, size_t(a.rows_x) * a.K * (a.prologue == 2 ? 2 : 1), nan);
  Guarded<uint32_t> w(a.w, size_t(a.E) * a.bands * a.K * words, 0xffffffffu);
  Guarded<T> scales(a.scales, size_t(a.E) * a.bands * a.K, nan);
  Guarded<T> biases(a.biases, size_t(a.E) * a.bands * a.K, nan);
  Guarded<uint32_t> w2(a.w2, a.w2 ? size_t(a.E) * a.bands2 * a.K * words : 0, 0xffffffffu);
  Guarded<T> scales2(a.scales2, a.w2 ? size_t(a.E) * a.bands2 * a.K : 0, nan);
  Guarded<T> biases2(a.biases2, a.w2 ? size_t(a.E) * a.bands2 * a.K : 0, nan);
  // An expert id read past the end of the list would be expert 0: a wrong, not a missing, weight.
  Guarded<int32_t> ids_signed(a.ids_unsigned ? nullptr : a.experts, a.ids_unsigned ? 0 : size_t(a.M), 0);
  Guarded<uint32_t> ids_unsigned(a.ids_unsigned ? a.experts : nullptr, a.ids_unsigned ? size_t(a.M) : 0, 0);
  Guarded<float> thresholds(a.threshold, a.threshold ? size_t(a.t_len) : 0, NAN);
  Guarded<T> y(nullptr, size_t(a.M) * N, poison<T>());

  FakeEncoder enc(a.seed);
  spqt::metal::Gemv<Buf> g{
      .type = a.type,
      .bits = a.bits,
      .group_size = a.gs,
      .M = a.M,
      .N = N,
      .K = a.K,
      .kind = a.threshold ? spqt::ActiveKind::Threshold : spqt::ActiveKind::Dense,
      .x = buf(x),
      .w = buf(w),
      .scales = buf(scales),
      .biases = buf(biases),
      .y = buf(y),
      .active = std::nullopt,
      .active_len = 0,
      .splits = a.splits,
      .prologue = {spqt::Prologue(a.prologue), std::nullopt, 0.0f},
  };
  if (a.threshold) {
    g.active = buf(thresholds);
    g.active_len = a.t_len;
  }
  g.experts = spqt::metal::Experts<Buf>{a.ids_unsigned ? buf(ids_unsigned) : buf(ids_signed), a.E,
                                        a.rows_x ? a.M / a.rows_x : 1};
  if (a.w2) {
    g.experts->second = spqt::metal::SecondExperts<Buf>{buf(w2), buf(scales2), buf(biases2), a.bands};
  }
  encode_and_read(enc, g, y, a.y);
}

} // namespace

extern "C" {

// kind: 0 dense, 1 index list (active: int32[active_len]), 2 packed list (active: int32[K + 1]),
// 3 threshold (active: float32[active_len], 1 or K). splits <= 0 uses the host's policy. A fused
// product: prologue 1 (RMSNorm, norm: K weights) or 2 (SwiGLU, x: M rows of 2K), residual (M, N).
int spqt_emu_zigzag_gemv(const char* type, int bits, int group_size, int kind, const void* x, const uint32_t* w,
                         const void* scales, const void* biases, const void* active, int active_len, void* y,
                         int M, int N, int K, int splits, uint64_t seed, int prologue, const void* norm, float eps,
                         const void* residual, char* err, int err_len) {
  try {
    GemvArgs a{bits, group_size, kind, x, scales, biases, active, w, active_len, y, M, N, K, splits, seed,
               prologue, norm, residual, eps};
    return with_type(type, [&]<typename T>() { gemv<T>(type, a); });
  } catch (const std::exception& e) {
    return report(e, err, err_len);
  }
}

// The experts' product: y (M, N) row m = x' (rows_x, K) row m / (M / rows_x) @ [W[e] | W2[e]].T for e =
// experts[m] (read as unsigned), w (E, bands, K, words), scales and biases (E, bands, K), the second
// set likewise with bands2; threshold: null (every column) or t_len float32 (one per expert, or one).
// splits <= 0 uses the host's policy.
int spqt_emu_zigzag_gather_gemv(const GatherArgs* args, char* err, int err_len) {
  try {
    return with_type(args->type, [&]<typename T>() { gather_gemv<T>(*args); });
  } catch (const std::exception& e) {
    return report(e, err, err_len);
  }
}

// threads <= 0 uses the host's policy. prologue, norm and eps as for spqt_emu_zigzag_gemv.
int spqt_emu_collect_active(const char* type, const void* x, const float* threshold, int t_len, int K,
                            int threads, uint64_t seed, int prologue, const void* norm, float eps, int32_t* out,
                            char* err, int err_len) {
  try {
    return with_type(type, [&]<typename T>() {
      Guarded<T> xg(x, size_t(K) * (prologue == 2 ? 2 : 1), T(NAN));
      Guarded<T> ng(norm, norm ? size_t(K) : 0, T(NAN));
      Guarded<float> t(threshold, t_len, NAN);
      Guarded<int32_t> o(nullptr, K + 1, poison<int32_t>());
      FakeEncoder enc(seed);
      spqt::metal::PrologueArgs<Buf> pro{spqt::Prologue(prologue), std::nullopt, eps};
      if (norm) {
        pro.norm = buf(ng);
      }
      spqt::metal::encode_collect(enc, buf(xg), buf(t), buf(o), type, K, t_len != 1, threads, pro);
      last_log = enc.log();
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
      FakeEncoder enc(seed);
      Buf view{s.ptr() + offset, tag_of<T>()};
      spqt::metal::encode_copy_to_contiguous(enc, view, buf(d), itemsize, std::vector<int32_t>(shape, shape + ndim),
                                             std::vector<int64_t>(strides, strides + ndim));
      last_log = enc.log();
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

// The dispatches of the last call: one "kernel grid=x,y,z threads=n" line each.
int spqt_emu_last_dispatches(char* out, int out_len) {
  std::snprintf(out, size_t(out_len), "%s", last_log.c_str());
  return int(last_log.size());
}

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
