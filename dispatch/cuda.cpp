// CUDA dispatch: picks the kernel instantiation and launch geometry, allocates the output and the
// split workspace, and adds one kernel node to MLX's CUDA graph.
#include "cuda.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"

#include "cuda_driver.h"
#include "kernel_names.h" // generated from kernels/cuda/instances.py

namespace spqt::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kCollectThreads = 1024;
constexpr int kMaxFusedK = kThreads * 64;  // the fused collection keeps 64 flags per thread
constexpr int kBlocksPerSM = 2;            // resident blocks per multiprocessor (launch bounds)
constexpr int kMaxSplits = 32;
constexpr int kMaxGridY = 65535;
// The tensor-core kernel's grid: about two blocks per multiprocessor (of four that fit), each
// keeping at least a few hundred columns. Measured on an H200, this beat four per multiprocessor
// for sparse walks and the fused collection, and matched it for dense ones.
constexpr int kMmaBlocksPerSM = 2;
constexpr int kMmaMinColumnsPerSplit = 256;
// 4-bit weights (groups of 64 or 128) of at least this size go to the tensor-core kernel, every
// kind of active set. Measured on an H200 (BENCHMARKS.md): 1.1-1.6x the general kernel's speed from
// 4096x4096 up for dense walks, lists at density 0.5 and fused collection; below, where a call's
// fixed costs dominate, it is not faster.
constexpr int64_t kMmaMinWeights = int64_t(1) << 24;
// The bulk-copy kernel's grid (kernels/cuda/zigzag_gemv_bulk.cu): at least one block per
// multiprocessor, each keeping at least one stage of columns. Measured on an H200 (BENCHMARKS.md),
// one to two blocks per multiprocessor beat more, smaller ones: each block streams its columns
// through a ring that stays full.
constexpr int kBulkMinColumnsPerSplit = 512;
// Up to how many rows the zigzag matmul runs. Beyond, dequantizing the weight once and multiplying
// with cuBLAS measured as fast on an H200: from 512 rows for 14336x4096 and 4096x14336 (4-bit g64
// fp16), from 1024 for 4096x4096 (BENCHMARKS.md).
constexpr int kMatmulMaxRows = 384;

std::string dtype_name(mx::Dtype t) {
  if (t == mx::float32) return "float32";
  if (t == mx::float16) return "float16";
  if (t == mx::bfloat16) return "bfloat16";
  throw std::invalid_argument("[spqt] unsupported dtype for the CUDA kernels.");
}

// Names of the embedded kernels, from the table the build generates (kernels/cuda/instances.py).
const char* gemv_kernel_name(const std::string& dtype, int bits, int group_size, bool tensor_cores, bool many_rows,
                             bool bulk_copies = false) {
  for (const auto& k : cuda_kernels::kGemv) {
    if (dtype == k.dtype && bits == k.bits && group_size == k.group_size && tensor_cores == k.tensor_cores &&
        many_rows == k.many_rows && bulk_copies == k.bulk_copies) {
      return k.name;
    }
  }
  throw std::invalid_argument(
      "[zigzag_gemv] no CUDA kernel was built for " + dtype + ", " + std::to_string(bits) + " bits, group size " +
      std::to_string(group_size) + (tensor_cores ? " (tensor cores" : " (") + (many_rows ? ", several rows" : "") +
      (bulk_copies ? ", bulk copies)." : ")."));
}

const char* matmul_kernel_name(const std::string& dtype, int bits, int group_size) {
  for (const auto& k : cuda_kernels::kMatmul) {
    if (dtype == k.dtype && bits == k.bits && group_size == k.group_size) {
      return k.name;
    }
  }
  throw std::invalid_argument("[zigzag_matmul] no CUDA kernel was built for " + dtype + ", " + std::to_string(bits) +
                              " bits, group size " + std::to_string(group_size) + ".");
}

const char* collect_kernel_name(const std::string& dtype) {
  for (const auto& k : cuda_kernels::kCollect) {
    if (dtype == k.dtype) {
      return k.name;
    }
  }
  throw std::invalid_argument("[collect_active] no CUDA kernel was built for " + dtype + ".");
}

// Blocks that split one band's columns: enough to fill the GPU once, but each keeping at least
// two full steps of columns per warp. A function of the shape and the device only, so the
// summation order, and with it every output bit, is the same on every call.
int split_count(int bands, int K, int group_size, mx::cu::CommandEncoder& enc) {
  const int cols_per_step = (kThreads / 32) * (32 / (group_size / 32));
  const int target = kBlocksPerSM * multiprocessor_count(enc);
  int splits = 1;
  while (splits < kMaxSplits && bands * splits * 2 <= target &&
         K / (2 * splits) >= 2 * cols_per_step) {
    splits *= 2;
  }
  return splits;
}

// Blocks per band for the tensor-core kernel: about kMmaBlocksPerSM per multiprocessor in all,
// each keeping a few hundred columns. Also a function of the shape and the device only.
int mma_split_count(int bands, int K, mx::cu::CommandEncoder& enc) {
  const int target = kMmaBlocksPerSM * multiprocessor_count(enc);
  int splits = 1;
  while (splits < kMaxSplits && bands * splits < target &&
         K / (2 * splits) >= kMmaMinColumnsPerSplit) {
    splits *= 2;
  }
  return splits;
}

// Blocks per band for the bulk-copy kernel: the fewest that give every multiprocessor a block.
int bulk_split_count(int bands, int K, mx::cu::CommandEncoder& enc) {
  const int target = multiprocessor_count(enc);
  int splits = 1;
  while (splits < kMaxSplits && bands * splits < target && K / (2 * splits) >= kBulkMinColumnsPerSplit) {
    splits *= 2;
  }
  return splits;
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

bool use_mma(int bits, int group_size, int N, int K) {
  const auto listed = [](int v, const auto& values) {
    return std::find(std::begin(values), std::end(values), v) != std::end(values);
  };
  return listed(bits, kTensorCoreBits) && listed(group_size, kTensorCoreGroupSizes) &&
      int64_t(N) * K >= kMmaMinWeights;
}

// The parameters that both GEMV kernels (zigzag_gemv.cu, zigzag_gemv_mma.cu) take first, in their
// order.
struct GemvArgs {
  void* x;
  void* w;
  void* scales;
  void* biases;
  void* active;
  void* out;
  void* partials;
  void* counters;
  int rows;
  int cols;
  int K;
  int x_stride;
  int kind;
  int n_host;
  int per_column;
  float t_value;
  int splits;
  void* norm;
  void* residual;
  int residual_stride;
  int prologue;
  float eps;
};

// Whether a tensor-core product runs on the bulk-copy kernel (kernels/cuda/zigzag_gemv_bulk.cu): a
// dense walk of one row of 16-bit x on sm_90 or newer, whose copied ranges (x, the norm weight,
// codes, scales and biases) are contiguous and 16-byte aligned, and K a multiple of 16 so that
// every split's ranges are too.
bool use_bulk(const GemvArgs& a, mx::Dtype dtype, mx::cu::CommandEncoder& enc) {
  return a.kind == int(ActiveKind::Dense) && a.rows == 1 && dtype.size() == 2 && a.x_stride == 1 && a.K % 16 == 0 &&
      aligned16(a.x) && aligned16(a.w) && aligned16(a.scales) && aligned16(a.biases) &&
      (a.norm == nullptr || aligned16(a.norm)) && compute_capability(enc) >= 90;
}

// Adds a GEMV kernel node: the common parameters, then `tail` (the general kernel's experts).
template <typename... Tail>
void add_gemv_node(mx::cu::CommandEncoder& enc, CUfunction f, dim3 grid, int threads, GemvArgs& a, Tail&... tail) {
  enc.add_kernel_node_ex(
      f, grid, dim3(threads), {}, 0, a.x, a.w, a.scales, a.biases, a.active, a.out, a.partials, a.counters, a.rows,
      a.cols, a.K, a.x_stride, a.kind, a.n_host, a.per_column, a.t_value, a.splits, a.norm, a.residual,
      a.residual_stride, a.prologue, a.eps, tail...);
}

// Whether the general kernel collects the active set inside (else a collection launch first).
bool collects_inside(bool mma, int K) {
  return mma || K <= kMaxFusedK;
}

// A row-contiguous input, as the kernels read them. The op functions make unevaluated inputs
// contiguous; an evaluated strided one is refused rather than read wrongly.
const mx::array& contiguous(const mx::array& a, const char* what) {
  if (!a.flags().row_contiguous) {
    throw std::invalid_argument(
        std::string("[zigzag_gemv] the CUDA kernels need a row-contiguous ") + what +
        "; pass mx.contiguous(...) of it.");
  }
  return a;
}

// The element stride between consecutive columns of x (or of a residual). One row may be any view
// (decode's x usually is an unevaluated, contiguous one); several rows must be row-contiguous.
int column_stride(const mx::array& x) {
  const int K = x.shape(-1);
  if (x.size() == size_t(K)) {
    return x.ndim() ? int(x.strides().back()) : 1;
  }
  contiguous(x, "x");
  return 1;
}

// Whether the kernels read one threshold per column; otherwise the scalar goes by value, since
// MLX keeps scalars in unified memory, slow to read from every block. The op functions spread a
// scalar that is not ready yet over the columns.
int per_column_threshold(const mx::array& t, float& value) {
  if (t.ndim() > 0) {
    return 1;
  }
  if (!t.is_available()) {
    throw std::logic_error("[zigzag_gemv] a scalar threshold must be ready before the kernel runs.");
  }
  value = *(t.data<float>());
  return 0;
}

// The count-prefixed active list of x into `out`: threshold array `t`, or (t null) the scalar t_value.
void collect_into(
    mx::cu::CommandEncoder& enc, const mx::array& x, const mx::array* t, float t_value, mx::array& out) {
  CUfunction f = kernel(collect_kernel_name(dtype_name(x.dtype())), enc);
  int K = x.shape(-1);
  int per_column = 0;
  void* t_ptr = mx::gpu_ptr<void>(x);  // unused for a threshold by value
  if (t) {
    per_column = per_column_threshold(*t, t_value);
    enc.set_input_array(*t);
    t_ptr = mx::gpu_ptr<void>(*t);
  }
  int x_stride = column_stride(x);
  enc.set_input_array(x);
  enc.set_output_array(out);
  void* x_ptr = mx::gpu_ptr<void>(x);
  void* out_ptr = mx::gpu_ptr<void>(out);
  enc.add_kernel_node_ex(
      f, dim3(1), dim3(kCollectThreads), {}, 0, x_ptr, t_ptr, out_ptr, K, x_stride, per_column, t_value);
}

// With several splits per band: the float32 partial rows of every (row, band, split) and one zeroed
// arrival counter per (row, band), alive until the kernel completes. Nothing with one split.
void split_workspace(mx::cu::CommandEncoder& enc, int rows, int bands, int splits, int gs, void*& partials,
                     void*& counters) {
  if (splits == 1) {
    return;
  }
  mx::array work({rows * bands * splits * gs}, mx::float32, nullptr, {});
  mx::array count({rows * bands}, mx::int32, nullptr, {});
  allocate(work, work.nbytes(), enc);
  allocate(count, count.nbytes(), enc, /* zeroed */ true);
  enc.add_temporary(work);
  enc.add_temporary(count);
  partials = mx::gpu_ptr<void>(work);
  counters = mx::gpu_ptr<void>(count);
}

} // namespace

bool folds(int bits, int group_size, int N, int K, ActiveKind kind, Prologue prologue, int rows) {
  // A separate collection launch would read x, not x', and makes one list, not one per row.
  return kind != ActiveKind::Threshold || (prologue == Prologue::Identity && rows == 1) ||
      collects_inside(use_mma(bits, group_size, N, K), K);
}

void collect_active(CollectActive& p, const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cu::get_command_encoder(p.stream());
  allocate(out, out.nbytes(), enc);
  collect_into(enc, inputs[0], &contiguous(inputs[1], "threshold"), 0.0f, out);
}

void zigzag_gemv(ZigzagGemv& p, const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cu::get_command_encoder(p.stream());
  const int gs = p.group_size();
  const mx::array& x = inputs[0];
  const mx::array& w = contiguous(inputs[1], "weight");
  const mx::array& scales = contiguous(inputs[2], "scales");
  const mx::array& biases = contiguous(inputs[3], "biases");
  int K = w.shape(1);
  const int N = out.shape(-1);
  const int M = int(out.size() / N);
  const int bands = N / gs;
  allocate(out, out.nbytes(), enc);
  if (out.size() == 0) {
    return;
  }

  int kind = int(p.kind());
  const bool mma = use_mma(p.bits(), gs, N, K);
  int n_host = 0;
  int per_column = 0;
  float t_value = 0.0f;
  void* active = mx::gpu_ptr<void>(x);  // unused by the dense walk; any pointer will do
  if (p.kind() != ActiveKind::Dense) {
    const mx::array* a = nullptr;  // none for a threshold by value
    if (p.threshold()) {
      t_value = *p.threshold();
    } else {
      a = &contiguous(inputs[4], "active set");
      enc.set_input_array(*a);
      active = mx::gpu_ptr<void>(*a);
    }
    if (p.kind() == ActiveKind::Indices) {
      n_host = a->size();
    } else if (p.kind() == ActiveKind::Threshold) {
      if (a) {
        per_column = per_column_threshold(*a, t_value);
      }
      if (!collects_inside(mma, K)) {
        // Too many columns for the general kernel's fused collection: collect once, then walk
        // the list (one row only: see folds). The tensor-core kernel's blocks each scan their
        // own columns: no limit.
        mx::array list({K + 1}, mx::int32, nullptr, {});
        allocate(list, list.nbytes(), enc);
        collect_into(enc, x, a, t_value, list);
        enc.add_temporary(list);
        enc.set_input_array(list);
        active = mx::gpu_ptr<void>(list);
        kind = int(ActiveKind::Packed);
      }
    }
  }

  enc.set_input_array(x);
  enc.set_input_array(w);
  enc.set_input_array(scales);
  enc.set_input_array(biases);
  enc.set_output_array(out);
  GemvArgs args{mx::gpu_ptr<void>(x), mx::gpu_ptr<void>(w), mx::gpu_ptr<void>(scales), mx::gpu_ptr<void>(biases), active,
                mx::gpu_ptr<void>(out), nullptr, nullptr, M, N, K, column_stride(x), kind, n_host, per_column, t_value,
                1, nullptr, nullptr, 1, int(p.prologue()), p.eps()};
  if (p.norm_input() >= 0) {
    const mx::array& nw = contiguous(inputs[p.norm_input()], "norm weight");
    enc.set_input_array(nw);
    args.norm = mx::gpu_ptr<void>(nw);
  }
  if (p.residual_input() >= 0) {
    const mx::array& r = inputs[p.residual_input()];
    args.residual_stride = column_stride(r);
    enc.set_input_array(r);
    args.residual = mx::gpu_ptr<void>(r);
  }

  const bool bulk = mma && use_bulk(args, x.dtype(), enc);
  args.splits = bulk ? bulk_split_count(bands, K, enc)
      : mma        ? mma_split_count(bands, K, enc)
                   : split_count(bands, K, gs, enc);
  split_workspace(enc, M, bands, args.splits, gs, args.partials, args.counters);

  // Several rows go to the tensor-core kernel that multiplies tensor_core_rows of them per pass,
  // reading each active group once for them all; the general kernel takes one row per pass.
  const bool many_rows = mma && M > 1;
  const int passes = many_rows ? (M + tensor_core_rows(x.itemsize()) - 1) / tensor_core_rows(x.itemsize()) : M;
  CUfunction f = kernel(gemv_kernel_name(dtype_name(x.dtype()), p.bits(), gs, mma, many_rows, bulk), enc);
  const dim3 grid(bands * args.splits, std::min(passes, kMaxGridY));
  if (mma) {
    add_gemv_node(enc, f, grid, bulk ? kBulkThreads : kThreads, args);
  } else {
    void* none = nullptr;  // a plain product: one weight
    int n_experts = 1;
    int x_div = 1;
    int first_bands = bands;
    add_gemv_node(enc, f, grid, kThreads, args, none, n_experts, x_div, none, none, none, first_bands);
  }
}

bool matmul_runs(mx::Dtype dtype, int rows) {
  return (dtype == mx::float16 || dtype == mx::bfloat16) && rows <= kMatmulMaxRows;
}

void zigzag_matmul(ZigzagMatmul& p, const std::vector<mx::array>& inputs, mx::array& out) {
  auto& enc = mx::cu::get_command_encoder(p.stream());
  const mx::array& x = contiguous(inputs[0], "x");
  const mx::array& w = contiguous(inputs[1], "weight");
  const mx::array& scales = contiguous(inputs[2], "scales");
  const mx::array& biases = contiguous(inputs[3], "biases");
  int K = w.shape(1);
  int N = out.shape(-1);
  int M = int(out.size() / N);
  allocate(out, out.nbytes(), enc);
  if (out.size() == 0) {
    return;
  }
  CUfunction f = kernel(matmul_kernel_name(dtype_name(x.dtype()), p.bits(), p.group_size()), enc);
  for (const mx::array* a : {&x, &w, &scales, &biases}) {
    enc.set_input_array(*a);
  }
  enc.set_output_array(out);
  void* x_ptr = mx::gpu_ptr<void>(x);
  void* w_ptr = mx::gpu_ptr<void>(w);
  void* scales_ptr = mx::gpu_ptr<void>(scales);
  void* biases_ptr = mx::gpu_ptr<void>(biases);
  void* out_ptr = mx::gpu_ptr<void>(out);
  // Rows of x fastest: the blocks that share a weight tile run together.
  const dim3 grid((M + kMatmulTileRows - 1) / kMatmulTileRows, (N + kMatmulTileColumns - 1) / kMatmulTileColumns);
  enc.add_kernel_node_ex(f, grid, dim3(kThreads), {}, 0, x_ptr, w_ptr, scales_ptr, biases_ptr, out_ptr, M, N, K);
}

bool gather_collects(int K) {
  return collects_inside(/* mma = */ false, K);
}

void zigzag_gather_gemv(ZigzagGatherGemv& p, const std::vector<mx::array>& inputs, mx::array& out) {
  // The general kernel, one row of the output per pass: the rows of a decode step each read their
  // own expert's weight (a Qwen3-30B-A3B expert, 768 x 2048, is below the tensor-core kernel's size).
  auto& enc = mx::cu::get_command_encoder(p.stream());
  const int gs = p.group_size();
  const mx::array& x = inputs[0];
  const mx::array& w = contiguous(inputs[1], "weight");
  const mx::array& scales = contiguous(inputs[2], "scales");
  const mx::array& biases = contiguous(inputs[3], "biases");
  const mx::array& experts = contiguous(inputs[4], "experts");
  int n_experts = w.shape(0);
  int K = w.shape(2);
  int N = out.shape(-1);
  int rows = int(out.size() / N);
  const int bands = N / gs;
  allocate(out, out.nbytes(), enc);
  if (out.size() == 0) {
    return;
  }
  int x_div = rows / int(x.size() / x.shape(-1));
  int kind = int(ActiveKind::Dense);
  void* active = mx::gpu_ptr<void>(x);  // unused by the dense walk; any pointer will do
  if (p.sparse()) {
    const mx::array& t = contiguous(inputs[p.threshold_input()], "threshold");
    enc.set_input_array(t);
    active = mx::gpu_ptr<void>(t);
    kind = int(ActiveKind::Threshold);
  }
  // The rows fill the grid as the bands of one large product would.
  int splits = split_count(bands * rows, K, gs, enc);
  void* partials = nullptr;
  void* counters = nullptr;
  split_workspace(enc, rows, bands, splits, gs, partials, counters);
  CUfunction f = kernel(gemv_kernel_name(dtype_name(x.dtype()), p.bits(), gs, false, false), enc);
  for (const mx::array* a : {&x, &w, &scales, &biases, &experts}) {
    enc.set_input_array(*a);
  }
  enc.set_output_array(out);
  GemvArgs args{mx::gpu_ptr<void>(x), mx::gpu_ptr<void>(w), mx::gpu_ptr<void>(scales), mx::gpu_ptr<void>(biases), active,
                mx::gpu_ptr<void>(out), partials, counters, rows, N, K, column_stride(x), kind, /* n_host */ 0,
                /* per_column */ 0, /* t_value */ 0.0f, splits, nullptr, nullptr, 1, int(p.prologue()), /* eps */ 0.0f};
  void* experts_ptr = mx::gpu_ptr<void>(experts);
  // A second set of experts: its bands follow the first's in every row.
  int first_bands = w.shape(1);
  void* w2_ptr = nullptr;
  void* scales2_ptr = nullptr;
  void* biases2_ptr = nullptr;
  if (p.paired()) {
    const int i = p.second_input();
    const mx::array& w2 = contiguous(inputs[i], "weight");
    const mx::array& scales2 = contiguous(inputs[i + 1], "scales");
    const mx::array& biases2 = contiguous(inputs[i + 2], "biases");
    for (const mx::array* a : {&w2, &scales2, &biases2}) {
      enc.set_input_array(*a);
    }
    w2_ptr = mx::gpu_ptr<void>(w2);
    scales2_ptr = mx::gpu_ptr<void>(scales2);
    biases2_ptr = mx::gpu_ptr<void>(biases2);
  }
  add_gemv_node(enc, f, dim3(bands * splits, std::min(rows, kMaxGridY)), kThreads, args, experts_ptr, n_experts, x_div, w2_ptr,
                scales2_ptr, biases2_ptr, first_bands);
}

} // namespace spqt::cuda
