// CUDA dispatch: picks the kernel instantiation and launch geometry and emits an MLX
// precompiled-kernel node (outputs come from MLX's device memory pool; the node joins MLX's CUDA
// graph). Kernel binaries are embedded by the build (cmake/cuda_kernels.cmake).
#include "cuda.h"

#include <stdexcept>
#include <string>
#include <unordered_map>

#include "mlx/backend/gpu/device_info.h"
#include "mlx/fast.h"
#include "mlx/ops.h"

#include "cuda_kernels.h"

namespace spqt::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kCollectThreads = 1024;
constexpr int kMaxFusedK = kThreads * 64;  // the fused collection keeps 64 flags per thread
constexpr int kTargetBlocks = 528;         // about four resident blocks per multiprocessor
constexpr int kMaxBlocks = 2048;
constexpr int kMaxSplits = 16;

std::string dtype_name(mx::Dtype t) {
  if (t == mx::float32) return "float32";
  if (t == mx::float16) return "float16";
  if (t == mx::bfloat16) return "bfloat16";
  throw std::invalid_argument("[spqt] unsupported dtype for the CUDA kernels.");
}

// The embedded binary of one kernel, as the string MLX's precompiled-kernel node takes.
const std::string& binary(const std::string& name) {
  static std::unordered_map<std::string, std::string> cache;
  auto it = cache.find(name);
  if (it == cache.end()) {
    const EmbeddedKernel* k = find_embedded_kernel(name);
    if (!k) {
      throw std::runtime_error("[spqt] no CUDA kernel named " + name + " in this build.");
    }
    it = cache.emplace(name, std::string(reinterpret_cast<const char*>(k->data), k->size)).first;
  }
  return it->second;
}

// Blocks that split one band's columns: enough blocks to fill the GPU, but never so many that a
// block's share of the columns leaves most of its warps idle. A function of the shape only, so
// the summation order, and with it every output bit, is the same on every call.
int split_count(int bands, int K, int group_size) {
  const int cols_per_step = (kThreads / 32) * (32 / (group_size / 32));
  int splits = 1;
  while (splits < kMaxSplits && bands * splits < kTargetBlocks && K / (2 * splits) >= cols_per_step) {
    splits *= 2;
  }
  return splits;
}

} // namespace

mx::array collect_active(const mx::array& x, const mx::array& threshold, mx::Stream s) {
  const int K = x.shape(-1);
  const std::string name = "spqt_collect_active_" + dtype_name(x.dtype());
  return mx::fast::precompiled_cuda_kernel(
      name, binary(name), {x, threshold}, {{K + 1}}, {mx::int32},
      {K, int(threshold.ndim() > 0)},
      {kCollectThreads, 1, 1}, {kCollectThreads, 1, 1},
      0, std::nullopt, true, s)[0];
}

mx::array zigzag_gemv(
    const std::vector<mx::array>& inputs_in,
    const mx::Shape& out_shape,
    int group_size,
    int bits,
    ActiveKind kind,
    mx::Stream s) {
  std::vector<mx::array> inputs = inputs_in;
  const mx::array x = inputs[0];  // a copy: inputs may grow below
  const int K = x.shape(-1);
  const int M = K ? int(x.size() / K) : 0;
  const int N = out_shape.back();
  const int bands = N / group_size;
  int n_host = 0;
  int per_column = 0;
  switch (kind) {
    case ActiveKind::Dense:
      inputs.push_back(x);  // the kernel's `active` parameter is unused; any pointer will do
      break;
    case ActiveKind::Indices:
      n_host = inputs[4].size();
      break;
    case ActiveKind::Packed:
      break;
    case ActiveKind::Threshold:
      per_column = inputs[4].ndim() > 0;
      if (K > kMaxFusedK) {
        // Too many columns for the fused collection: collect once, then walk the list.
        inputs[4] = collect_active(mx::reshape(x, {K}, s), inputs[4], s);
        kind = ActiveKind::Packed;
      }
      break;
  }
  if (M == 0 || N == 0) {
    return mx::zeros(out_shape, x.dtype(), s);
  }
  const int splits = split_count(bands, K, group_size);
  const int band_blocks = std::min(bands, std::max(1, kMaxBlocks / splits));
  const std::string name = "spqt_zigzag_gemv_" + dtype_name(x.dtype()) + "_b" +
      std::to_string(bits) + "_g" + std::to_string(group_size);
  const mx::Shape rows_shape = splits == 1 ? out_shape : mx::Shape{splits, M, N};
  auto rows = mx::fast::precompiled_cuda_kernel(
      name, binary(name), inputs, {rows_shape}, {splits == 1 ? x.dtype() : mx::float32},
      {M, N, K, int(kind), n_host, per_column, splits},
      {band_blocks * splits * kThreads, M, 1}, {kThreads, 1, 1},
      0, std::nullopt, true, s)[0];
  if (splits == 1) {
    return rows;
  }
  const std::string reduce = "spqt_reduce_splits_" + dtype_name(x.dtype());
  return mx::fast::precompiled_cuda_kernel(
      reduce, binary(reduce), {rows}, {out_shape}, {x.dtype()}, {M * N, splits},
      {M * N, 1, 1}, {kThreads, 1, 1}, 0, std::nullopt, false, s)[0];
}

} // namespace spqt::cuda
