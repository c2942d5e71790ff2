// Metal dispatch of the primitives: encodes the kernels of kernels/metal (compiled into
// spqt_mlx.metallib, installed next to the extension module) on MLX's command encoder for the
// primitive's stream.
#include "metal.h"

#include <stdexcept>

#ifdef _METAL_

#include <dlfcn.h>

#include <algorithm>
#include <filesystem>
#include <optional>
#include <string>

#include "mlx/allocator.h"
#include "mlx/backend/metal/device.h"

#include "../kernels/metal/kernel_names.h"
#include "../kernels/metal/params.h"

namespace spqt::metal {

namespace {

namespace names = metal_kernels;
using namespace metal_params;

// The directory of this extension module, where spqt_mlx.metallib is installed.
const std::string& module_dir() {
  static const std::string dir = [] {
    Dl_info info;
    if (!dladdr(reinterpret_cast<const void*>(&module_dir), &info) || !info.dli_fname) {
      throw std::runtime_error("[spqt] cannot locate the extension module to load spqt_mlx.metallib.");
    }
    return std::filesystem::path(info.dli_fname).parent_path().string();
  }();
  return dir;
}

MTL::Library* library(mx::metal::Device& d) {
  return d.get_library("spqt_mlx", module_dir());
}

std::string type_name(mx::Dtype t) {
  if (t == mx::float32) {
    return "float32";
  }
  if (t == mx::float16) {
    return "float16";
  }
  if (t == mx::bfloat16) {
    return "bfloat16";
  }
  throw std::invalid_argument("[spqt] the Metal kernels take float32, float16 or bfloat16 activations.");
}

MTL::Size groups_for(int64_t elements, int threads) {
  return MTL::Size((elements + threads - 1) / threads, 1, 1);
}

// Encodes everything one eval_gpu needs: pipeline lookups, contiguous copies and temporaries.
struct Encoding {
  mx::metal::Device& device;
  mx::metal::CommandEncoder& encoder;
  MTL::Library* lib;

  explicit Encoding(const mx::Stream& s)
      : device(mx::metal::device(s.device)),
        encoder(mx::metal::get_command_encoder(s)),
        lib(library(device)) {}

  MTL::ComputePipelineState* kernel(const std::string& name) {
    return device.get_kernel(name, lib);
  }

  // A fresh array the command buffer keeps alive until it completes.
  mx::array temporary(mx::Shape shape, mx::Dtype dtype) {
    mx::array a(std::move(shape), dtype, nullptr, {});
    a.set_data(mx::allocator::malloc(a.nbytes()));
    encoder.add_temporary(a);
    return a;
  }

  // `a` itself when row-contiguous; otherwise a row-contiguous copy made on the GPU (views such as
  // transposes, broadcasts and strided slices, so the kernels can index densely).
  mx::array contiguous(const mx::array& a) {
    if (a.flags().row_contiguous || a.size() == 0) {
      return a;
    }
    if (a.itemsize() != 2 && a.itemsize() != 4) {
      throw std::invalid_argument("[spqt] unexpected element size for a Metal input.");
    }
    auto out = temporary(a.shape(), a.dtype());
    const int ndim = a.ndim();
    const int64_t size = a.size();
    encoder.set_compute_pipeline_state(kernel(names::copy_to_contiguous(a.itemsize())));
    encoder.set_input_array(a, 0);
    encoder.set_output_array(out, 1);
    encoder.set_vector_bytes(a.shape(), 2);
    encoder.set_vector_bytes(a.strides(), 3);
    encoder.set_bytes(ndim, 4);
    encoder.set_bytes(size, 5);
    encoder.dispatch_threadgroups(
        groups_for(size, kElementwiseThreads), MTL::Size(kElementwiseThreads, 1, 1));
    return out;
  }

  // out (K + 1,) int32 = [n, ascending active k..., -1...] for x of K elements.
  void collect(const mx::array& x, const mx::array& threshold, mx::array& out) {
    const int K = x.size();
    const int t_stride = threshold.ndim() == 0 ? 0 : 1;
    auto* pipeline = kernel(names::collect_active(type_name(x.dtype())));
    const int max_threads =
        std::min<int>(kCollectMaxThreads, pipeline->maxTotalThreadsPerThreadgroup()) / kSimdSize * kSimdSize;
    const int threads = std::min(max_threads, (K + kSimdSize - 1) / kSimdSize * kSimdSize);
    encoder.set_compute_pipeline_state(pipeline);
    encoder.set_input_array(x, 0);
    encoder.set_input_array(threshold, 1);
    encoder.set_output_array(out, 2);
    encoder.set_bytes(K, 3);
    encoder.set_bytes(t_stride, 4);
    encoder.dispatch_threadgroups(MTL::Size(1, 1, 1), MTL::Size(threads, 1, 1));
  }
};

} // namespace

void zigzag_gemv(ZigzagGemv& p, const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  if (out.size() == 0) {
    return;
  }
  Encoding enc(p.stream());
  std::vector<mx::array> in;
  for (const auto& a : inputs) {
    in.push_back(enc.contiguous(a));
  }
  const auto& x = in[0];
  const int K = x.shape(-1);
  const int M = x.size() / K;
  const int N = out.shape(-1);
  const int bands = N / p.group_size();
  const auto type = type_name(x.dtype());

  // The active list the kernel walks. listed >= 0: a plain list of that length; < 0: count-prefixed.
  // A threshold is collected on the device into a temporary packed list first: no host round-trip.
  const bool sparse = p.kind() != ActiveKind::Dense;
  std::optional<mx::array> list;
  int listed = 0;
  switch (p.kind()) {
    case ActiveKind::Dense:
      break;
    case ActiveKind::Indices:
      list = in[4];
      listed = in[4].size();
      break;
    case ActiveKind::Packed:
      list = in[4];
      listed = -1;
      break;
    case ActiveKind::Threshold: {
      list = enc.temporary(mx::Shape{K + 1}, mx::int32);
      enc.collect(x, in[4], *list);
      listed = -1;
      break;
    }
  }

  const int splits = gemv_splits(p.kind() == ActiveKind::Indices ? listed : K);
  std::optional<mx::array> partials;
  if (splits > 1) {
    partials = enc.temporary(mx::Shape{M * splits * N}, mx::float32);
  }

  auto& e = enc.encoder;
  e.set_compute_pipeline_state(
      enc.kernel(names::zigzag_gemv(sparse, type, p.bits(), p.group_size())));
  e.set_input_array(x, 0);
  e.set_input_array(in[1], 1);
  e.set_input_array(in[2], 2);
  e.set_input_array(in[3], 3);
  // Unused slots (dense walk, empty list, single split) are bound to a valid buffer all the same.
  e.set_input_array(list && list->size() > 0 ? *list : x, 4);
  e.set_output_array(out, 5);
  e.set_output_array(partials ? *partials : out, 6);
  e.set_bytes(K, 7);
  e.set_bytes(N, 8);
  e.set_bytes(listed, 9);
  e.dispatch_threadgroups(MTL::Size(bands, splits, M), MTL::Size(kGemvThreads, 1, 1));

  if (splits > 1) {
    // Second pass: add the per-split partials in a fixed order.
    const int size = M * N;
    e.set_compute_pipeline_state(enc.kernel(names::zigzag_gemv_reduce(type)));
    e.set_input_array(*partials, 0);
    e.set_output_array(out, 1);
    e.set_bytes(N, 2);
    e.set_bytes(splits, 3);
    e.set_bytes(size, 4);
    e.dispatch_threadgroups(groups_for(size, kElementwiseThreads), MTL::Size(kElementwiseThreads, 1, 1));
  }
}

void collect_active(CollectActive& p, const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  Encoding enc(p.stream());
  auto x = enc.contiguous(inputs[0]);
  auto t = enc.contiguous(inputs[1]);
  enc.collect(x, t, out);
}

} // namespace spqt::metal

#else

namespace spqt::metal {

void zigzag_gemv(ZigzagGemv&, const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "[zigzag_gemv] this build of spqt_mlx has no kernels for this GPU backend; "
      "use a CPU stream or rebuild with its kernels.");
}

void collect_active(CollectActive&, const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "[collect_active] this build of spqt_mlx has no kernels for this GPU backend; "
      "use a CPU stream or rebuild with its kernels.");
}

} // namespace spqt::metal

#endif
