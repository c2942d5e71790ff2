#include "primitives.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/backend/cuda/cuda.h"

#include "../kernels/cpu/zigzag_gemv.h"
#include "cuda.h"
#include "metal.h"
#include "templates.h"

namespace spqt {

namespace {

// A row-contiguous stand-in for `a`: `a` itself, or a fresh buffer that copy_strided fills.
mx::array contiguous_like(const mx::array& a, bool& needs_copy) {
  needs_copy = !a.flags().row_contiguous;
  if (!needs_copy) {
    return a;
  }
  mx::array out(a.shape(), a.dtype(), nullptr, {});
  out.set_data(mx::allocator::malloc(out.nbytes()));
  return out;
}

// Copies a strided array (broadcast strides included) into a row-contiguous one of the same shape.
void copy_strided(const mx::array& src, mx::array& dst) {
  const size_t item = src.itemsize();
  const auto& shape = src.shape();
  const auto& strides = src.strides();
  const int nd = src.ndim();
  const char* in = src.data<char>();
  char* out = dst.data<char>();
  std::vector<int> pos(nd, 0);
  for (size_t i = 0; i < dst.size(); ++i) {
    int64_t off = 0;
    for (int d = 0; d < nd; ++d) {
      off += int64_t(pos[d]) * strides[d];
    }
    std::memcpy(out + i * item, in + off * item, item);
    for (int d = nd - 1; d >= 0; --d) {
      if (++pos[d] < shape[d]) {
        break;
      }
      pos[d] = 0;
    }
  }
}

// The inputs of a CPU primitive as its task reads them: row-contiguous stand-ins, registered with the
// encoder (strided ones as temporaries), filled by materialize() inside the task.
class CpuInputs {
 public:
  CpuInputs(const std::vector<mx::array>& inputs, mx::array& out, mx::cpu::CommandEncoder& encoder) {
    for (const auto& a : inputs) {
      bool needs_copy;
      src_.push_back(mx::array::unsafe_weak_copy(a));
      dst_.push_back(contiguous_like(a, needs_copy));
      copy_.push_back(needs_copy);
      encoder.set_input_array(a);
      if (needs_copy) {
        encoder.add_temporary(dst_.back());
      }
    }
    encoder.set_output_array(out);
    for (auto& d : dst_) {
      d = mx::array::unsafe_weak_copy(d);
    }
  }

  // Copies the strided inputs into their stand-ins; returns the row-contiguous inputs.
  const std::vector<mx::array>& materialize() {
    for (size_t i = 0; i < src_.size(); ++i) {
      if (copy_[i]) {
        copy_strided(src_[i], dst_[i]);
      }
    }
    return dst_;
  }

 private:
  std::vector<mx::array> src_, dst_;
  std::vector<bool> copy_;
};

template <typename F>
void dispatch_float(mx::Dtype t, F&& f) {
  if (t == mx::float32) {
    f.template operator()<float>();
  } else if (t == mx::float16) {
    f.template operator()<mx::float16_t>();
  } else if (t == mx::bfloat16) {
    f.template operator()<mx::bfloat16_t>();
  } else {
    throw std::invalid_argument("[spqt] unsupported activation dtype.");
  }
}

// dy @ W for a zigzag-quantized W (bands, K, words), dy (..., N): the (rows, K) gradient of x @ W.T.
// Band b is an MLX-quantized (K, group_size) matrix with one group per row, so dy_b @ W_b^T is MLX's
// quantized matmul with transpose=true, batched over the bands. On CUDA that batched call gave
// non-finite rows (mlx 0.32.4, H200: 40 rows, K = 320, group size 64, after other work had used
// the memory pool), so there W is dequantized into a transient copy for one matmul.
mx::array times_weight(
    const mx::array& dy, const mx::array& w, const mx::array& scales, const mx::array& biases, int group_size,
    int bits, mx::Stream s) {
  const int bands = w.shape(0);
  const int K = w.shape(1);
  auto s3 = mx::expand_dims(scales, -1, s);
  auto b3 = mx::expand_dims(biases, -1, s);
  if (s.device == mx::Device::gpu && mx::cu::is_available()) {
    // (bands, K, gs) -> W (N, K)
    auto W = mx::dequantize(w, s3, b3, group_size, bits, "affine", std::nullopt, std::nullopt, s);
    W = mx::reshape(mx::swapaxes(W, 1, 2, s), {bands * group_size, K}, s);
    return mx::matmul(mx::reshape(dy, {-1, bands * group_size}, s), W, s);
  }
  auto dy_bands = mx::transpose(mx::reshape(dy, {-1, bands, group_size}, s), {1, 0, 2}, s);
  auto dx = mx::quantized_matmul(dy_bands, w, s3, b3, true, group_size, bits, "affine", s);
  return mx::sum(dx, 0, false, s); // float32 accumulation is MLX's
}

// The shape of x @ W.T for inputs x (..., K) and w (N/group_size, K, words): x's, N columns.
mx::Shape product_shape(const std::vector<mx::array>& inputs, int group_size) {
  auto shape = inputs[0].shape();
  shape.back() = inputs[1].shape(0) * group_size;
  return shape;
}

void refuse_weight_gradient(const char* op, const std::vector<int>& argnums, int first, int last) {
  for (int a : argnums) {
    if (a >= first && a <= last) {
      throw std::invalid_argument(
          std::string("[") + op + "] the zigzag-quantized weight has no gradient: it is not trainable "
          "(freeze it, as nn.QuantizedLinear is).");
    }
  }
}

} // namespace

bool ZigzagGemv::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const ZigzagGemv*>(&other);
  return o && o->state() == state();
}

std::vector<mx::Shape> ZigzagGemv::output_shapes(const std::vector<mx::array>& inputs) {
  return {product_shape(inputs, group_size_)};
}

std::vector<mx::array> ZigzagGemv::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  refuse_weight_gradient("zigzag_gemv", argnums, 1, 3);
  auto s = stream();
  if (prologue_ != Prologue::Identity || has_residual_) {
    return fused_vjp(primals, cotangents, argnums);
  }
  const auto& x = primals[0];
  const int K = x.shape(-1);
  auto dx = times_weight(cotangents[0], primals[1], primals[2], primals[3], group_size_, bits_, s);
  // Only the active columns took part: the others get no gradient, a column listed twice twice.
  auto times_listed = [&](const mx::array& idx, const mx::array& valid) {
    auto safe = mx::where(valid, idx, mx::array(0, mx::int32), s);
    auto ones = mx::astype(valid, dx.dtype(), s);
    return mx::scatter_add_axis(mx::zeros({K}, dx.dtype(), s), safe, ones, 0, s);
  };
  switch (kind_) {
    case ActiveKind::Dense:
      break;
    case ActiveKind::Threshold:
      dx = mx::where(mx::greater(mx::abs(mx::reshape(x, {-1, K}, s), s), threshold_array(primals), s), dx,
                     mx::zeros_like(dx, s), s);
      break;
    case ActiveKind::Indices: {
      const auto& idx = primals[4];
      auto valid = mx::logical_and(mx::greater_equal(idx, mx::array(0), s), mx::less(idx, mx::array(K), s), s);
      dx = mx::multiply(dx, times_listed(idx, valid), s);
      break;
    }
    case ActiveKind::Packed: {
      const auto& packed = primals[4];
      auto n = mx::clip(mx::slice(packed, {0}, {1}, s), mx::array(0), mx::array(K), s);
      auto idx = mx::slice(packed, {1}, {K + 1}, s);
      auto listed = mx::less(mx::arange(K, mx::int32, s), n, s);
      auto in_range = mx::logical_and(mx::greater_equal(idx, mx::array(0), s), mx::less(idx, mx::array(K), s), s);
      dx = mx::multiply(dx, times_listed(idx, mx::logical_and(listed, in_range, s)), s);
      break;
    }
  }
  dx = mx::astype(mx::reshape(dx, x.shape(), s), x.dtype(), s);
  std::vector<mx::array> grads;
  for (int a : argnums) {
    // The active set (input 4: a list or thresholds) may be computed from x; the choice of
    // columns is piecewise constant, so it passes no gradient.
    grads.push_back(a == 0 ? dx : mx::zeros_like(primals[a], s));
  }
  return grads;
}

mx::array ZigzagGemv::threshold_array(const std::vector<mx::array>& inputs) const {
  return threshold_ ? mx::array(*threshold_) : inputs[4];
}

std::vector<mx::array> ZigzagGemv::fused_vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums) {
  // The gradient of the composition the kernels fuse: prologue, plain product, residual. Only x,
  // the norm weight and the residual are variables; the weight and the active set are constants.
  auto s = stream();
  const int norm = norm_input();
  const int residual = residual_input();
  const int active = active_input();
  std::vector<int> vars{0};
  for (int i : {norm, residual}) {
    if (i >= 0) {
      vars.push_back(i);
    }
  }
  std::optional<mx::array> set;
  if (kind_ == ActiveKind::Threshold) {
    set = threshold_array(primals);
  } else if (active >= 0) {
    set = primals[active];
  }
  auto fun = [&](const std::vector<mx::array>& in) {
    auto at = [&](int input) { return in[std::find(vars.begin(), vars.end(), input) - vars.begin()]; };
    Fusion fusion{prologue_, std::nullopt, eps_, std::nullopt};
    if (norm >= 0) {
      fusion.norm_weight = at(norm);
    }
    if (residual >= 0) {
      fusion.residual = at(residual);
    }
    return std::vector<mx::array>{unfolded(fusion, in[0], [&](const mx::array& xp) {
      return zigzag_gemv(xp, primals[1], primals[2], primals[3], set, kind_, group_size_, bits_, {}, s);
    }, s)};
  };
  std::vector<mx::array> var_primals;
  for (int i : vars) {
    var_primals.push_back(primals[i]);
  }
  auto grads = mx::vjp(fun, var_primals, cotangents).second;
  std::vector<mx::array> out;
  for (int a : argnums) {
    auto it = std::find(vars.begin(), vars.end(), a);
    out.push_back(it == vars.end() ? mx::zeros_like(primals[a], s) : grads[it - vars.begin()]);
  }
  return out;
}

void ZigzagGemv::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  CpuInputs in(inputs, out, encoder);
  encoder.dispatch([in = std::move(in),
                    out = mx::array::unsafe_weak_copy(out),
                    gs = group_size_,
                    bits = bits_,
                    kind = kind_,
                    prologue = prologue_,
                    eps = eps_,
                    active = active_input(),
                    threshold = threshold_,
                    norm = norm_input(),
                    residual = residual_input()]() mutable {
    const auto& dst = in.materialize();
    const auto& x = dst[0];
    const int K = dst[1].shape(1);
    const int M = int(out.size() / std::max(out.shape(-1), 1));
    const int N = out.shape(-1);
    if (out.size() == 0) {
      return;
    }
    std::vector<int32_t> collected;
    const int32_t* cols = nullptr;
    int64_t n = K;
    if (kind == ActiveKind::Indices) {
      cols = dst[active].data<int32_t>();
      n = dst[active].size();
    } else if (kind == ActiveKind::Packed) {
      cols = dst[active].data<int32_t>() + 1;
      n = std::clamp<int64_t>(dst[active].data<int32_t>()[0], 0, K);
    }
    dispatch_float(x.dtype(), [&]<typename T>() {
      const T* xp = x.data<T>();
      std::vector<T> transformed;
      const bool rows_thresholded = kind == ActiveKind::Threshold && M > 1;  // zeroes x' in place
      if (prologue != Prologue::Identity || rows_thresholded) {
        transformed.resize(size_t(M) * K);
        cpu::prologue<T>(xp, prologue, norm >= 0 ? dst[norm].data<T>() : nullptr, eps, M, K, transformed.data());
        xp = transformed.data();
      }
      if (kind == ActiveKind::Threshold) {
        const float* t = threshold ? &*threshold : dst[active].data<float>();
        const int t_stride = !threshold && dst[active].ndim() ? 1 : 0;
        collected.resize(K + 1);
        if (rows_thresholded) {
          cpu::threshold_rows<T>(transformed.data(), t, t_stride, M, K, collected.data());
        } else {
          cpu::collect_active<T>(xp, t, t_stride, K, collected.data());
        }
        cols = collected.data() + 1;
        n = collected[0];
      }
      dispatch_bits_group_size(bits, gs, [&]<int BITS, int GS>() {
        cpu::zigzag_gemv<T, BITS, GS>(
            xp,
            dst[1].data<uint32_t>(),
            dst[2].data<T>(),
            dst[3].data<T>(),
            cols,
            n,
            out.data<T>(),
            M,
            N,
            K,
            residual >= 0 ? dst[residual].data<T>() : nullptr);
      });
    });
  });
}

void ZigzagGemv::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  if (mx::cu::is_available()) {
    cuda::zigzag_gemv(*this, inputs, out);
  } else {
    metal::zigzag_gemv(*this, inputs, out);
  }
}

bool ZigzagGatherGemv::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const ZigzagGatherGemv*>(&other);
  return o && o->state() == state();
}

std::vector<mx::Shape> ZigzagGatherGemv::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[4].shape();
  shape.push_back(inputs[1].shape(1) * group_size_);
  return {shape};
}

std::vector<mx::array> ZigzagGatherGemv::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  for (int a : argnums) {
    if (a >= 1 && a != 4 && a != threshold_input()) {
      throw std::invalid_argument(
          "[zigzag_gather_gemv] the zigzag-quantized experts have no gradient: they are not trainable "
          "(freeze them, as mlx-lm's QuantizedSwitchLinear is).");
    }
  }
  auto s = stream();
  const int E = primals[1].shape(0);
  const int K = primals[1].shape(2);
  const auto ids = mx::flatten(primals[4], s);
  const int R = ids.size();
  // x' as the kernels read it (the prologue's ops are differentiable), as rows.
  auto fun = [&](const mx::array& x) { return mx::reshape(apply_prologue(x, prologue_, std::nullopt, 0.0f, s), {-1, K}, s); };
  const auto xp = fun(primals[0]);
  const int R_x = xp.shape(0);
  const int x_div = R / R_x;
  // A row of an expert not below E gets no gradient (ids are read as unsigned, as the kernels do).
  auto unsigned_ids = mx::astype(ids, mx::uint32, s);
  auto valid = mx::less(unsigned_ids, mx::array(uint32_t(E)), s);
  auto safe = mx::astype(mx::where(valid, unsigned_ids, mx::array(uint32_t(0)), s), mx::int32, s);
  auto dy = mx::reshape(cotangents[0], {R, -1}, s);
  // dx'_r = dy_r @ W_e, over each set of experts. Band b of expert e is an MLX-quantized (K,
  // group_size) matrix with one group per row (row e * bands + b of the stacked bands), so the
  // rows' bands are one gathered quantized matmul with transpose=true.
  auto part = [&](const mx::array& w, const mx::array& sc, const mx::array& bi, int first_column) {
    const int bands = w.shape(1);
    auto band_rows = mx::add(mx::expand_dims(mx::multiply(safe, mx::array(bands), s), -1, s),
                             mx::arange(bands, mx::int32, s), s);  // (R, bands)
    auto dy_part = mx::reshape(mx::slice(dy, {0, first_column}, {R, first_column + bands * group_size_}, s),
                               {R, bands, 1, group_size_}, s);
    auto d = mx::gather_qmm(
        dy_part, mx::reshape(w, {E * bands, K, w.shape(3)}, s), mx::reshape(sc, {E * bands, K, 1}, s),
        mx::reshape(bi, {E * bands, K, 1}, s), std::nullopt, band_rows, true, group_size_, bits_, "affine",
        std::nullopt, false, s);
    return mx::reshape(mx::sum(d, 1, false, s), {R, K}, s);
  };
  auto dxp = part(primals[1], primals[2], primals[3], 0);
  if (paired_) {
    const int second = second_input();
    dxp = mx::add(dxp, part(primals[second], primals[second + 1], primals[second + 2],
                            primals[1].shape(1) * group_size_), s);
  }
  auto keep = mx::expand_dims(valid, -1, s);
  if (sparse_) {
    // Only the row's active columns took part.
    auto rows = mx::take(xp, mx::floor_divide(mx::arange(R, mx::int32, s), mx::array(x_div), s), 0, s);
    auto t = mx::expand_dims(mx::take(primals[threshold_input()], safe, 0, s), -1, s);
    keep = mx::logical_and(keep, mx::greater(mx::abs(rows, s), t, s), s);
  }
  dxp = mx::where(keep, dxp, mx::zeros_like(dxp, s), s);
  // The rows that share one row of x add up; then back through the prologue.
  dxp = mx::astype(mx::sum(mx::reshape(dxp, {R_x, x_div, K}, s), 1, false, s), xp.dtype(), s);
  auto dx = mx::vjp(
      [&](const std::vector<mx::array>& in) { return std::vector<mx::array>{fun(in[0])}; }, {primals[0]}, {dxp})
      .second[0];
  std::vector<mx::array> grads;
  for (int a : argnums) {
    // The experts and thresholds are indices and a piecewise-constant choice: no gradient.
    grads.push_back(a == 0 ? dx : mx::zeros_like(primals[a], s));
  }
  return grads;
}

void ZigzagGatherGemv::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  CpuInputs in(inputs, out, encoder);
  encoder.dispatch([in = std::move(in),
                    out = mx::array::unsafe_weak_copy(out),
                    gs = group_size_,
                    bits = bits_,
                    prologue = prologue_,
                    second = second_input(),
                    threshold = threshold_input()]() mutable {
    const auto& dst = in.materialize();
    const auto& x = dst[0];
    const int E = dst[1].shape(0);
    const int K = dst[1].shape(2);
    const int N = out.shape(-1);
    const int R = int(out.size() / N);
    if (R == 0) {
      return;
    }
    const int R_x = int(x.size() / x.shape(-1));
    const int x_div = R / R_x;
    // Each set of experts: its arrays and the first output column of its rows.
    struct Set {
      const mx::array *w, *scales, *biases;
      int first_column;
    };
    std::vector<Set> sets{{&dst[1], &dst[2], &dst[3], 0}};
    if (second >= 0) {
      sets.push_back({&dst[second], &dst[second + 1], &dst[second + 2], dst[1].shape(1) * gs});
    }
    const uint32_t* ids = dst[4].data<uint32_t>();  // int32 or uint32, read as unsigned as the GPUs do
    dispatch_float(x.dtype(), [&]<typename T>() {
      const T* xp = x.data<T>();
      std::vector<T> transformed;
      if (prologue != Prologue::Identity) {
        transformed.resize(size_t(R_x) * K);
        cpu::prologue<T>(xp, prologue, nullptr, 0.0f, R_x, K, transformed.data());
        xp = transformed.data();
      }
      std::vector<int32_t> collected(K + 1);
      for (int r = 0; r < R; ++r) {
        T* y = out.data<T>() + int64_t(r) * N;
        const uint32_t e = ids[r];
        if (e >= uint32_t(E)) {
          std::fill(y, y + N, T(0.0f));
          continue;
        }
        const T* xr = xp + int64_t(r / x_div) * K;
        const int32_t* cols = nullptr;
        int64_t n = K;
        if (threshold >= 0) {
          cpu::collect_active<T>(xr, dst[threshold].data<float>() + e, 0, K, collected.data());
          cols = collected.data() + 1;
          n = collected[0];
        }
        for (const auto& set : sets) {
          const int bands = set.w->shape(1);
          const int64_t groups = int64_t(e) * bands * K;  // expert e's first group
          dispatch_bits_group_size(bits, gs, [&]<int BITS, int GS>() {
            cpu::zigzag_gemv<T, BITS, GS>(
                xr, set.w->data<uint32_t>() + groups * set.w->shape(3), set.scales->data<T>() + groups,
                set.biases->data<T>() + groups, cols, n, y + set.first_column, 1, bands * GS, K);
          });
        }
      }
    });
  });
}

void ZigzagGatherGemv::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  if (mx::cu::is_available()) {
    cuda::zigzag_gather_gemv(*this, inputs, out);
  } else {
    metal::zigzag_gather_gemv(*this, inputs, out);
  }
}

bool ZigzagMatmul::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const ZigzagMatmul*>(&other);
  return o && o->state() == state();
}

std::vector<mx::Shape> ZigzagMatmul::output_shapes(const std::vector<mx::array>& inputs) {
  return {product_shape(inputs, group_size_)};
}

std::vector<mx::array> ZigzagMatmul::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  refuse_weight_gradient("zigzag_matmul", argnums, 1, 3);
  auto s = stream();
  const auto& x = primals[0];
  auto dx = times_weight(cotangents[0], primals[1], primals[2], primals[3], group_size_, bits_, s);
  return {mx::astype(mx::reshape(dx, x.shape(), s), x.dtype(), s)};
}

// zigzag_matmul creates the primitive only for CUDA streams.
constexpr const char* kMatmulCudaOnly =
    "[zigzag_matmul] the tensor-core product runs on CUDA only; the op composes MLX ops elsewhere.";

void ZigzagMatmul::eval_cpu(const std::vector<mx::array>&, mx::array&) {
  throw std::logic_error(kMatmulCudaOnly);
}

void ZigzagMatmul::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  if (!mx::cu::is_available()) {
    throw std::logic_error(kMatmulCudaOnly);
  }
  cuda::zigzag_matmul(*this, inputs, out);
}

std::vector<mx::Shape> CollectActive::output_shapes(const std::vector<mx::array>& inputs) {
  return {mx::Shape{inputs[0].shape(-1) + 1}};
}

void CollectActive::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  bool copy_x, copy_t;
  auto x = contiguous_like(inputs[0], copy_x);
  auto t = contiguous_like(inputs[1], copy_t);
  for (const auto& in : inputs) {
    encoder.set_input_array(in);
  }
  if (copy_x) {
    encoder.add_temporary(x);
  }
  if (copy_t) {
    encoder.add_temporary(t);
  }
  encoder.set_output_array(out);
  encoder.dispatch([x_src = mx::array::unsafe_weak_copy(inputs[0]),
                    t_src = mx::array::unsafe_weak_copy(inputs[1]),
                    x = mx::array::unsafe_weak_copy(x),
                    t = mx::array::unsafe_weak_copy(t),
                    copy_x,
                    copy_t,
                    out = mx::array::unsafe_weak_copy(out)]() mutable {
    if (copy_x) {
      copy_strided(x_src, x);
    }
    if (copy_t) {
      copy_strided(t_src, t);
    }
    const int K = x.shape(-1);
    dispatch_float(x.dtype(), [&]<typename T>() {
      cpu::collect_active<T>(x.data<T>(), t.data<float>(), t.ndim() ? 1 : 0, K, out.data<int32_t>());
    });
  });
}

void CollectActive::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  if (mx::cu::is_available()) {
    cuda::collect_active(*this, inputs, out);
  } else {
    metal::collect_active(*this, inputs, out);
  }
}

} // namespace spqt
