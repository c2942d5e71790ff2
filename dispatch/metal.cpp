// Metal dispatch of the primitives: the host encoding of dispatch/metal_encoding.h, run on MLX's
// command encoder for the primitive's stream. The kernels (kernels/metal) are compiled into
// spqt_mlx.metallib, installed next to the extension module.
#include "metal.h"

#include <stdexcept>

#ifdef _METAL_

#include <dlfcn.h>

#include <filesystem>
#include <string>

#include "mlx/allocator.h"
#include "mlx/backend/metal/device.h"

#include "metal_encoding.h"

namespace spqt::metal {

namespace {

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

// The encoder of metal_encoding.h over MLX's command encoder: buffers are arrays, workspaces are
// arrays the command buffer keeps alive until it completes.
class Encoder {
 public:
  using Buffer = mx::array;

  explicit Encoder(const mx::Stream& s)
      : device_(mx::metal::device(s.device)),
        encoder_(mx::metal::get_command_encoder(s)),
        library_(device_.get_library("spqt_mlx", module_dir())) {}

  Buffer temporary(int64_t elements, Element type) {
    return temporary(mx::Shape{int(elements)}, type == Element::Float32 ? mx::float32 : mx::int32);
  }

  void set_kernel(const std::string& name) {
    pipeline_ = device_.get_kernel(name, library_);
    encoder_.set_compute_pipeline_state(pipeline_);
  }

  int max_threads_per_threadgroup() {
    return int(pipeline_->maxTotalThreadsPerThreadgroup());
  }

  void set_input(const Buffer& a, int slot) {
    encoder_.set_input_array(a, slot);
  }
  void set_output(const Buffer& a, int slot) {
    mx::array handle = a; // MLX takes outputs by non-const reference; the handle shares the data
    encoder_.set_output_array(handle, slot);
  }
  void set_int(int32_t v, int slot) {
    encoder_.set_bytes(v, slot);
  }
  void set_int64(int64_t v, int slot) {
    encoder_.set_bytes(v, slot);
  }
  void set_ints(const std::vector<int32_t>& v, int slot) {
    encoder_.set_vector_bytes(v, slot);
  }
  void set_int64s(const std::vector<int64_t>& v, int slot) {
    encoder_.set_vector_bytes(v, slot);
  }
  void set_float(float v, int slot) {
    encoder_.set_bytes(v, slot);
  }

  void dispatch(Size3 groups, Size3 threads) {
    encoder_.dispatch_threadgroups(MTL::Size(groups.x, groups.y, groups.z), MTL::Size(threads.x, threads.y, threads.z));
  }

  // `a` itself when row-contiguous; otherwise a row-contiguous copy made on the GPU (views such as
  // transposes, broadcasts and strided slices, so the kernels can index densely).
  mx::array contiguous(const mx::array& a) {
    if (a.flags().row_contiguous || a.size() == 0) {
      return a;
    }
    auto out = temporary(a.shape(), a.dtype());
    encode_copy_to_contiguous(*this, a, out, int(a.itemsize()), std::vector<int32_t>(a.shape().begin(), a.shape().end()),
                              std::vector<int64_t>(a.strides().begin(), a.strides().end()));
    return out;
  }

  std::vector<mx::array> contiguous(const std::vector<mx::array>& inputs) {
    std::vector<mx::array> out;
    for (const auto& a : inputs) {
      out.push_back(contiguous(a));
    }
    return out;
  }

 private:
  // A fresh array the command buffer keeps alive until it completes.
  mx::array temporary(mx::Shape shape, mx::Dtype dtype) {
    mx::array a(std::move(shape), dtype, nullptr, {});
    a.set_data(mx::allocator::malloc(a.nbytes()));
    encoder_.add_temporary(a);
    return a;
  }

  mx::metal::Device& device_;
  mx::metal::CommandEncoder& encoder_;
  MTL::Library* library_;
  MTL::ComputePipelineState* pipeline_ = nullptr;
};

} // namespace

void zigzag_gemv(ZigzagGemv& p, const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  if (out.size() == 0) {
    return;
  }
  Encoder enc(p.stream());
  const auto in = enc.contiguous(inputs);
  const int K = in[1].shape(1);
  const int active = p.active_input();
  Gemv<mx::array> g{
      .type = type_name(in[0].dtype()),
      .bits = p.bits(),
      .group_size = p.group_size(),
      .M = int(out.size() / out.shape(-1)),
      .N = out.shape(-1),
      .K = K,
      .kind = p.kind(),
      .x = in[0],
      .w = in[1],
      .scales = in[2],
      .biases = in[3],
      .y = out,
      .active = active < 0 ? std::nullopt : std::optional<mx::array>(in[active]),
      .active_len = active < 0 ? 0 : int(in[active].size()),
      .splits = 0,
      .prologue = {p.prologue(), std::nullopt, p.eps()},
  };
  if (p.norm_input() >= 0) {
    g.prologue.norm = in[p.norm_input()];
  }
  if (p.residual_input() >= 0) {
    g.residual = in[p.residual_input()];
  }
  encode_gemv(enc, g);
}

void zigzag_gather_gemv(ZigzagGatherGemv& p, const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  if (out.size() == 0) {
    return;
  }
  Encoder enc(p.stream());
  const auto in = enc.contiguous(inputs);
  // x (..., K) of R_x rows (2K with the SwiGLU prologue), w (E, bands, K, words), y (..., N) of R rows,
  // R a multiple of R_x (ops.cpp checks the shapes). Ids may be int32 or uint32: the kernel reads
  // both as unsigned.
  const int E = in[1].shape(0);
  const int K = in[1].shape(2);
  const int M = int(out.size() / out.shape(-1));
  const int rows_x = int(in[0].size() / in[0].shape(-1));
  const int threshold = p.threshold_input();
  Gemv<mx::array> g{
      .type = type_name(in[0].dtype()),
      .bits = p.bits(),
      .group_size = p.group_size(),
      .M = M,
      .N = out.shape(-1),
      .K = K,
      .kind = threshold >= 0 ? ActiveKind::Threshold : ActiveKind::Dense,
      .x = in[0],
      .w = in[1],
      .scales = in[2],
      .biases = in[3],
      .y = out,
      .active = threshold >= 0 ? std::optional<mx::array>(in[threshold]) : std::nullopt,
      .active_len = threshold >= 0 ? int(in[threshold].size()) : 0,
      .prologue = {p.prologue(), std::nullopt, 0.0f},
      .experts = Experts<mx::array>{in[4], E, M / rows_x},
  };
  if (const int second = p.second_input(); second >= 0) {
    g.experts->second = SecondExperts<mx::array>{in[second], in[second + 1], in[second + 2], in[1].shape(1)};
  }
  encode_gemv(enc, g);
}

void collect_active(CollectActive& p, const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  Encoder enc(p.stream());
  auto x = enc.contiguous(inputs[0]);
  auto t = enc.contiguous(inputs[1]);
  encode_collect(enc, x, t, out, type_name(x.dtype()), int(x.size()), t.size() != 1);
}

} // namespace spqt::metal

#else

namespace spqt::metal {

void zigzag_gemv(ZigzagGemv&, const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "[zigzag_gemv] this build of spqt_mlx has no kernels for this GPU backend; "
      "use a CPU stream or rebuild with its kernels.");
}

void zigzag_gather_gemv(ZigzagGatherGemv&, const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "[zigzag_gather_gemv] this build of spqt_mlx has no kernels for this GPU backend; "
      "use a CPU stream or rebuild with its kernels.");
}

void collect_active(CollectActive&, const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "[collect_active] this build of spqt_mlx has no kernels for this GPU backend; "
      "use a CPU stream or rebuild with its kernels.");
}

} // namespace spqt::metal

#endif
