#include "ops.h"

#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string_view>

#include "mlx/backend/cuda/cuda.h"
#include "mlx/compile.h"
#include "mlx/fast.h"
#include "mlx/ops.h"

#include "cuda.h"
#include "primitives.h"

namespace spqt {

namespace {

[[noreturn]] void fail(const std::string& where, const std::string& what) {
  throw std::invalid_argument("[" + where + "] " + what);
}

std::string shape_str(const mx::Shape& shape) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    os << (i ? ", " : "") << shape[i];
  }
  os << (shape.size() == 1 ? ",)" : ")");
  return os.str();
}

std::string dtype_str(mx::Dtype t) {
  std::ostringstream os;
  os << t;
  return os.str();
}

bool is_float_dtype(mx::Dtype t) {
  return t == mx::float32 || t == mx::float16 || t == mx::bfloat16;
}

template <size_t N>
void check_one_of(const std::string& where, const char* what, int value, const int (&allowed)[N]) {
  std::string list;
  for (int a : allowed) {
    if (a == value) {
      return;
    }
    list += (list.empty() ? "" : ", ") + std::to_string(a);
  }
  fail(where, std::string(what) + " must be one of " + list + ", got " + std::to_string(value) + ".");
}

void check_bits_group_size(const std::string& where, int group_size, int bits) {
  check_one_of(where, "bits", bits, kSupportedBits);
  check_one_of(where, "group_size", group_size, kSupportedGroupSizes);
}

// Checks a zigzag-quantized weight: w (N/group_size, K, words), or with `experts` the stacked
// (E, N/group_size, K, words) of E experts, and scales and biases shaped as w without its words.
// `what` names the weight in messages. Returns K.
int check_weight(
    const std::string& where, const mx::array& w, const mx::array& scales, const mx::array& biases, int group_size,
    int bits, bool experts = false, const std::string& what = "the") {
  check_bits_group_size(where, group_size, bits);
  const int lead = experts ? 1 : 0;
  if (w.dtype() != mx::uint32 || w.ndim() != 3 + lead) {
    fail(where, what + " packed weight must be uint32 of shape (" + (experts ? "E, " : "") +
                    "N/group_size, K, group_size*bits/32), got " + dtype_str(w.dtype()) + " " + shape_str(w.shape()) +
                    ".");
  }
  const int K = w.shape(lead + 1);
  if (w.size() == 0) {
    fail(where, what + " packed weight " + shape_str(w.shape()) +
                    " is empty: it needs at least one band of output rows and one input column" +
                    (experts ? ", and one expert." : "."));
  }
  if (w.shape(-1) != group_size * bits / 32) {
    fail(where, what + " packed weight's last dimension is " + std::to_string(w.shape(-1)) +
                    " words, but group_size=" + std::to_string(group_size) + " and bits=" +
                    std::to_string(bits) + " need " + std::to_string(group_size * bits / 32) + ".");
  }
  const mx::Shape sb_shape(w.shape().begin(), w.shape().end() - 1);
  if (scales.shape() != sb_shape || biases.shape() != sb_shape) {
    fail(where, what + " scales and biases must have shape " + shape_str(sb_shape) + ", got " +
                    shape_str(scales.shape()) + " and " + shape_str(biases.shape()) + ".");
  }
  if (scales.dtype() != biases.dtype() || !is_float_dtype(scales.dtype())) {
    fail(where, what + " scales and biases must share one float dtype, got " + dtype_str(scales.dtype()) +
                    " and " + dtype_str(biases.dtype()) + ".");
  }
  return K;
}

// Checks the activation of a product: a float array (..., columns) in the dtype of the weight's
// scales; `why` ends the message about a wrong column count.
void check_x(
    const std::string& where, const mx::array& x, int columns, int K, mx::Dtype dtype, const std::string& why) {
  if (!is_float_dtype(x.dtype())) {
    fail(where, "x must be float32, float16 or bfloat16, got " + dtype_str(x.dtype()) + ".");
  }
  if (x.ndim() < 1) {
    fail(where, "x must have at least one dimension (..., K).");
  }
  if (x.shape(-1) != columns) {
    fail(where, "x has " + std::to_string(x.shape(-1)) + " input features but the weight has K=" +
                    std::to_string(K) + why);
  }
  if (x.dtype() != dtype) {
    fail(where, "x is " + dtype_str(x.dtype()) + " but the weight's scales are " + dtype_str(dtype) +
                    "; convert one to the other.");
  }
}

// Checks an activation and its threshold over K columns; collect_active takes a single row.
void validate_threshold(
    const std::string& where, const mx::array& x, const mx::array& threshold, int K, bool one_row) {
  if (one_row && x.size() != static_cast<size_t>(x.shape(-1))) {
    fail(where, "active columns are collected for a single token: x must hold one row, got shape " +
                    shape_str(x.shape()) + ".");
  }
  if (!(threshold.ndim() == 0 || (threshold.ndim() == 1 && threshold.shape(0) == K))) {
    fail(where, "threshold must be a scalar or have shape (" + std::to_string(K) + ",), got " +
                    shape_str(threshold.shape()) + ".");
  }
  if (!mx::issubdtype(threshold.dtype(), mx::floating) &&
      !mx::issubdtype(threshold.dtype(), mx::integer)) {
    fail(where, "threshold must be a real number, got dtype " + dtype_str(threshold.dtype()) + ".");
  }
}

// The threshold of a checked activation (any number of rows), as float32.
mx::array check_threshold(
    const std::string& where,
    const mx::array& x,
    const mx::array& threshold,
    int K,
    mx::StreamOrDevice s) {
  validate_threshold(where, x, threshold, K, /* one_row = */ false);
  return mx::astype(threshold, mx::float32, s);
}

// The CUDA GEMV kernels read one row of x (and of a residual) with any stride (`strided_row`),
// everything else row-contiguous. Evaluated arrays show their layout now; the rest go through
// mx::contiguous, which copies only when needed but is one more array to evaluate, so decode's single
// row skips it, as does what mx::contiguous made already.
void make_contiguous(std::vector<mx::array>& inputs, mx::Stream s, int residual = -1, bool strided_row = true) {
  const auto& x = inputs[0];
  const bool one_row = strided_row && x.ndim() > 0 && x.size() == static_cast<size_t>(x.shape(-1));
  for (size_t i = one_row ? 1 : 0; i < inputs.size(); ++i) {
    if (one_row && int(i) == residual) {
      continue;  // read with its stride, like x
    }
    auto& a = inputs[i];
    // What mx::contiguous and these products make is row-contiguous already (compared without
    // allocating: this runs for every input of every decode product).
    const std::string_view made_by = a.has_primitive() ? a.primitive().name() : "";
    const bool made_contiguous = made_by == "Contiguous" || made_by == "ZigzagGemv" || made_by == "ZigzagGatherGemv" ||
        made_by == "ZigzagMatmul";
    if (!made_contiguous && !(a.is_available() && a.flags().row_contiguous)) {
      a = mx::contiguous(a, false, s);
    }
  }
}

// A ready scalar threshold reaches the CUDA kernels by value; one computed in the same graph is
// spread over the columns instead (the kernels reading it in place gave wrong sums on the H100).
mx::array cuda_threshold(mx::array t, int K, mx::Stream s) {
  if (t.ndim() == 0 && !t.is_available() && s.device == mx::Device::gpu && mx::cu::is_available()) {
    return mx::broadcast_to(t, {K}, s);
  }
  return t;
}

// The fusion of a product of x (its last axis of K or 2K columns) into out_shape, checked; the norm
// weight cast to x's dtype.
Fusion check_fusion(
    const std::string& where,
    const Fusion& f,
    const mx::array& x,
    int K,
    const mx::Shape& out_shape,
    mx::Stream s) {
  Fusion out = f;
  switch (f.prologue) {
    case Prologue::Identity:
    case Prologue::SwiGLU:
      if (f.norm_weight) {
        fail(where, "a norm weight is given, but the prologue is not RMSNorm.");
      }
      break;
    case Prologue::RmsNorm: {
      if (!f.norm_weight) {
        fail(where, "the RMSNorm prologue needs the norm's weight.");
      }
      const auto& nw = *f.norm_weight;
      if (nw.shape() != mx::Shape{K} || !is_float_dtype(nw.dtype())) {
        fail(where, "the norm weight must be a float array of shape (" + std::to_string(K) + ",), got " +
                        dtype_str(nw.dtype()) + " " + shape_str(nw.shape()) + ".");
      }
      if (!std::isfinite(f.eps) || f.eps < 0.0f) {
        fail(where, "eps must be finite and >= 0, got " + std::to_string(f.eps) + ".");
      }
      out.norm_weight = mx::astype(nw, x.dtype(), s);
      break;
    }
    default:
      fail(where, "unknown prologue.");
  }
  if (f.residual) {
    const auto& r = *f.residual;
    if (r.shape() != out_shape || r.dtype() != x.dtype()) {
      fail(where, "the residual must be " + dtype_str(x.dtype()) + " of shape " + shape_str(out_shape) +
                      " (the product's), got " + dtype_str(r.dtype()) + " " + shape_str(r.shape()) + ".");
    }
  }
  return out;
}

// silu(gate) * up in float32, rounded once as the kernels do, compiled into one elementwise kernel
// (as mlx-lm's own swiglu is), so that the unfolded path launches no more than the unfused model.
const std::function<std::vector<mx::array>(const std::vector<mx::array>&)>& swiglu() {
  static const auto f = mx::compile(
      [](const std::vector<mx::array>& in) {
        auto gate = mx::astype(in[0], mx::float32);
        auto up = mx::astype(in[1], mx::float32);
        auto silu = mx::multiply(gate, mx::sigmoid(gate));
        return std::vector<mx::array>{mx::astype(mx::multiply(silu, up), in[0].dtype())};
      },
      /* shapeless = */ true);
  return f;
}

} // namespace

mx::array apply_prologue(
    const mx::array& x,
    Prologue prologue,
    const std::optional<mx::array>& norm_weight,
    float eps,
    mx::StreamOrDevice s) {
  const std::string where = "apply_prologue";
  if (!is_float_dtype(x.dtype()) || x.ndim() < 1) {
    fail(where, "x must be a float array of shape (..., K), got " + dtype_str(x.dtype()) + " " +
                    shape_str(x.shape()) + ".");
  }
  switch (prologue) {
    case Prologue::Identity:
      return x;
    case Prologue::RmsNorm: {
      const int K = x.shape(-1);
      if (!norm_weight || norm_weight->shape() != mx::Shape{K} || !is_float_dtype(norm_weight->dtype())) {
        fail(where, "the RMSNorm prologue needs a float norm weight of shape (" + std::to_string(K) + ",).");
      }
      return mx::fast::rms_norm(x, mx::astype(*norm_weight, x.dtype(), s), eps, s);
    }
    case Prologue::SwiGLU: {
      if (x.shape(-1) % 2) {
        fail(where, "the SwiGLU prologue reads gate and up: x needs an even last dimension, got " +
                        shape_str(x.shape()) + ".");
      }
      const int K = x.shape(-1) / 2;
      auto parts = mx::split(x, mx::Shape{K}, -1, s);
      mx::StreamContext on(mx::to_stream(s));  // the compiled function's ops take the default stream
      return swiglu()({parts[0], parts[1]})[0];
    }
  }
  throw std::invalid_argument("[zigzag_gemv] unknown prologue.");
}

mx::array unfolded(
    const Fusion& fusion,
    const mx::array& x,
    const std::function<mx::array(const mx::array&)>& product,
    mx::StreamOrDevice s) {
  auto y = product(apply_prologue(x, fusion.prologue, fusion.norm_weight, fusion.eps, s));
  return fusion.residual ? mx::add(*fusion.residual, y, s) : y;
}

mx::array zigzag_gemv(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    const std::optional<mx::array>& active,
    ActiveKind kind,
    int group_size,
    int bits,
    const Fusion& fusion,
    mx::StreamOrDevice s) {
  const std::string where = "zigzag_gemv";
  const int K = check_weight(where, w, scales, biases, group_size, bits);
  const int N = w.shape(0) * group_size;
  const bool swiglu = fusion.prologue == Prologue::SwiGLU;
  check_x(where, x, swiglu ? 2 * K : K, K, scales.dtype(), swiglu ? " (SwiGLU reads gate and up: 2K)." : ".");

  auto stream = mx::to_stream(s);
  auto out_shape = x.shape();
  out_shape.back() = N;
  auto fused = check_fusion(where, fusion, x, K, out_shape, stream);
  const bool on_cuda = stream.device == mx::Device::gpu && mx::cu::is_available();
  const int rows = int(x.size() / x.shape(-1));
  if (on_cuda && !cuda::folds(bits, group_size, N, K, kind, fusion.prologue, rows)) {
    // Where a CUDA product would collect its active set in a launch of its own (which reads x, not
    // x', and makes one list), run the neighbours as MLX ops around the plain product; several
    // rows keep their own active entries (the others zeroed) and walk every column.
    return unfolded(fused, x, [&](const mx::array& xp) {
      if (rows == 1) {
        return zigzag_gemv(xp, w, scales, biases, active, kind, group_size, bits, {}, stream);
      }
      auto t = check_threshold(where, xp, active.value(), K, stream);
      auto kept = mx::where(mx::greater(mx::abs(xp, stream), t, stream), xp, mx::zeros_like(xp, stream), stream);
      return zigzag_gemv(kept, w, scales, biases, std::nullopt, ActiveKind::Dense, group_size, bits, {}, stream);
    }, stream);
  }
  std::vector<mx::array> inputs{x, w, scales, biases};
  std::optional<float> threshold;
  switch (kind) {
    case ActiveKind::Dense:
      break;
    case ActiveKind::Indices: {
      const auto& idx = active.value();
      if (!mx::issubdtype(idx.dtype(), mx::integer)) {
        fail(where, "indices must be an integer array, got " + dtype_str(idx.dtype()) + ".");
      }
      if (idx.ndim() != 1) {
        fail(where, "indices must be one-dimensional, got shape " + shape_str(idx.shape()) + ".");
      }
      if (idx.dtype() == mx::int32) {
        inputs.push_back(idx);
      } else {
        // Narrowing could wrap an out-of-range entry into range; mark those -1 (skipped) first.
        auto wide = mx::astype(idx, mx::int64, stream);
        auto out_of_range = mx::logical_or(
            mx::less(wide, mx::array(0, mx::int64), stream),
            mx::greater_equal(wide, mx::array(K, mx::int64), stream), stream);
        inputs.push_back(mx::astype(
            mx::where(out_of_range, mx::array(-1, mx::int64), wide, stream), mx::int32, stream));
      }
      break;
    }
    case ActiveKind::Packed: {
      const auto& packed = active.value();
      if (packed.dtype() != mx::int32 || packed.shape() != mx::Shape{K + 1}) {
        fail(where, "a packed active list must be int32 of shape (" + std::to_string(K + 1) +
                        ",), got " + dtype_str(packed.dtype()) + " " + shape_str(packed.shape()) + ".");
      }
      inputs.push_back(packed);
      break;
    }
    case ActiveKind::Threshold: {
      auto t = check_threshold(where, x, active.value(), K, stream);
      if (on_cuda && t.ndim() == 0 && t.is_available()) {
        // Decode's scalar threshold goes to the CUDA kernels by value, read here once: not an
        // input, so the GPU never holds it and encoding never reads it back.
        threshold = *t.data<float>();  // ready: item() would go through eval
      } else {
        inputs.push_back(cuda_threshold(t, K, stream));
      }
      break;
    }
    default:
      fail(where, "unknown kind of active set.");
  }

  if (fused.norm_weight) {
    inputs.push_back(*fused.norm_weight);
  }
  int residual = -1;
  if (fused.residual) {
    residual = int(inputs.size());
    inputs.push_back(*fused.residual);
  }
  if (on_cuda) {
    make_contiguous(inputs, stream, residual);
  }
  return mx::array(
      std::move(out_shape),
      x.dtype(),
      std::make_shared<ZigzagGemv>(
          stream, group_size, bits, kind, fused.prologue, fused.eps, fused.residual.has_value(), threshold),
      std::move(inputs));
}

mx::array zigzag_matmul(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size,
    int bits,
    mx::StreamOrDevice s) {
  const std::string where = "zigzag_matmul";
  const int K = check_weight(where, w, scales, biases, group_size, bits);
  const int bands = w.shape(0);
  check_x(where, x, K, K, scales.dtype(), ".");
  auto stream = mx::to_stream(s);
  auto out_shape = x.shape();
  out_shape.back() = bands * group_size;
  const int rows = int(x.size() / K);
  if (rows == 0) {
    // An empty batch or sequence: an empty result, as nn.Linear gives (MLX's quantized matmul
    // would divide by the zero row count).
    return mx::zeros(out_shape, x.dtype(), stream);
  }
  const bool on_cuda = stream.device == mx::Device::gpu && mx::cu::is_available();
  if (on_cuda && cuda::matmul_runs(x.dtype(), rows)) {
    std::vector<mx::array> inputs{x, w, scales, biases};
    make_contiguous(inputs, stream, -1, /* strided_row = */ false);
    return mx::array(
        out_shape, x.dtype(), std::make_shared<ZigzagMatmul>(stream, group_size, bits), std::move(inputs));
  }
  // Band b is an MLX-quantized (K, group_size) matrix with one group per row: all bands are one
  // batched quantized matmul with transpose=false, (bands, rows, group_size). MLX's CUDA backend
  // has only a naive kernel for that case (about 30 s to build on its first call for each format,
  // and slow), so on CUDA the bands are dequantized into a transient copy for one batched matmul
  // instead (in float32 it follows MLX's TF32 setting, MLX_ENABLE_TF32).
  auto x_rows = mx::reshape(x, {1, rows, K}, stream);
  auto s3 = mx::expand_dims(scales, -1, stream);
  auto b3 = mx::expand_dims(biases, -1, stream);
  auto y = on_cuda
      ? mx::matmul(x_rows, mx::dequantize(w, s3, b3, group_size, bits, "affine", std::nullopt, std::nullopt, stream),
                   stream)
      : mx::quantized_matmul(x_rows, w, s3, b3, false, group_size, bits, "affine", stream);
  return mx::reshape(mx::swapaxes(y, 0, 1, stream), out_shape, stream);
}

mx::array zigzag_gather_gemv(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    const mx::array& experts,
    const std::optional<mx::array>& threshold,
    int group_size,
    int bits,
    Prologue prologue,
    const std::optional<SecondExperts>& second,
    mx::StreamOrDevice s) {
  const std::string where = "zigzag_gather_gemv";
  const int K = check_weight(where, w, scales, biases, group_size, bits, /* experts = */ true, "the experts'");
  const int E = w.shape(0);
  int all_bands = w.shape(1);
  if (second) {
    check_weight(where, second->w, second->scales, second->biases, group_size, bits, true, "the second experts'");
    if (second->w.shape(0) != E || second->w.shape(2) != K) {
      fail(where, "the second experts must have the first's " + std::to_string(E) + " experts and K=" +
                      std::to_string(K) + ", got " + shape_str(second->w.shape()) + ".");
    }
    if (second->scales.dtype() != scales.dtype()) {
      fail(where, "the second experts' scales and biases must share the first experts' dtype " +
                      dtype_str(scales.dtype()) + ", got " + dtype_str(second->scales.dtype()) + ".");
    }
    all_bands += second->w.shape(1);
  }
  const int N = all_bands * group_size;
  if (prologue != Prologue::Identity && prologue != Prologue::SwiGLU) {
    fail(where, "a gathered product takes no prologue but SwiGLU.");
  }
  const bool swiglu = prologue == Prologue::SwiGLU;
  check_x(where, x, swiglu ? 2 * K : K, K, scales.dtype(), swiglu ? " (SwiGLU reads gate and up: 2K)." : ".");
  if (!mx::issubdtype(experts.dtype(), mx::integer)) {
    fail(where, "experts must be an integer array, got " + dtype_str(experts.dtype()) + ".");
  }
  const int64_t R = experts.size();
  const int64_t R_x = x.size() / x.shape(-1);
  auto out_shape = experts.shape();
  out_shape.push_back(N);
  if (R == 0 && R_x == 0) {
    return mx::zeros(out_shape, x.dtype(), s);  // nothing routed: an empty result, as gather_qmm gives
  }
  if (R_x == 0 || R % R_x) {
    fail(where, "experts has " + std::to_string(R) + " entries, which is not a multiple of x's " +
                    std::to_string(R_x) + " rows (each row of x feeds the same number of consecutive entries).");
  }
  auto stream = mx::to_stream(s);
  auto ids = experts;
  if (ids.itemsize() == 8) {
    // Narrowing could wrap an out-of-range entry into range; mark those -1 (a zero row) first.
    auto wide = mx::astype(ids, mx::int64, stream);
    auto outside = mx::logical_or(mx::less(wide, mx::array(0, mx::int64), stream),
                                  mx::greater_equal(wide, mx::array(E, mx::int64), stream), stream);
    ids = mx::where(outside, mx::array(-1, mx::int64), wide, stream);
  }
  if (ids.dtype() != mx::int32 && ids.dtype() != mx::uint32) {
    // The kernels read 32-bit ids as unsigned: a negative one is out of range as any id >= E.
    ids = mx::astype(ids, mx::int32, stream);
  }
  std::optional<mx::array> t;
  if (threshold) {
    const auto& given = *threshold;
    if (!(given.ndim() == 0 || given.shape() == mx::Shape{E})) {
      fail(where, "threshold must be a scalar or have shape (" + std::to_string(E) + ",) (one per expert), got " +
                      shape_str(given.shape()) + ".");
    }
    if (!mx::issubdtype(given.dtype(), mx::floating) && !mx::issubdtype(given.dtype(), mx::integer)) {
      fail(where, "threshold must be a real number, got dtype " + dtype_str(given.dtype()) + ".");
    }
    t = mx::broadcast_to(mx::astype(given, mx::float32, stream), {E}, stream);
  }
  const bool on_cuda = stream.device == mx::Device::gpu && mx::cu::is_available();
  if (t && on_cuda && !cuda::gather_collects(K)) {
    // Too many columns for the kernel's collection: every row keeps its own entries of x' (the
    // others zeroed, with MLX ops) and the product walks every column.
    const int x_div = int(R / R_x);
    auto xp = mx::reshape(apply_prologue(x, prologue, std::nullopt, 0.0f, stream), {int(R_x), K}, stream);
    auto rows = mx::take(xp, mx::floor_divide(mx::arange(int(R), mx::int32, stream), mx::array(x_div), stream), 0,
                         stream);
    auto flat = mx::flatten(mx::astype(ids, mx::uint32, stream), stream);
    auto safe = mx::minimum(flat, mx::array(uint32_t(E - 1)), stream);
    auto row_t = mx::expand_dims(mx::take(*t, safe, 0, stream), -1, stream);
    auto kept = mx::where(mx::greater(mx::abs(rows, stream), row_t, stream), rows, mx::zeros_like(rows, stream), stream);
    auto y = zigzag_gather_gemv(kept, w, scales, biases, flat, std::nullopt, group_size, bits, Prologue::Identity,
                                second, stream);
    return mx::reshape(y, out_shape, stream);  // (R, N): one row of x per entry
  }
  std::vector<mx::array> inputs{x, w, scales, biases, ids};
  if (second) {
    inputs.insert(inputs.end(), {second->w, second->scales, second->biases});
  }
  if (t) {
    inputs.push_back(*t);
  }
  if (on_cuda) {
    make_contiguous(inputs, stream);
  }
  return mx::array(
      std::move(out_shape), x.dtype(),
      std::make_shared<ZigzagGatherGemv>(stream, group_size, bits, t.has_value(), prologue, second.has_value()),
      std::move(inputs));
}

void check_collect_active(const mx::array& x, const mx::array& threshold) {
  const std::string where = "collect_active";
  if (!is_float_dtype(x.dtype())) {
    fail(where, "x must be float32, float16 or bfloat16, got " + dtype_str(x.dtype()) + ".");
  }
  if (x.ndim() < 1 || x.size() == 0) {
    fail(where, "x must be a non-empty activation of shape (..., K).");
  }
  validate_threshold(where, x, threshold, x.shape(-1), /* one_row = */ true);
}

mx::array collect_active(const mx::array& x, const mx::array& threshold, mx::StreamOrDevice s) {
  check_collect_active(x, threshold);
  auto stream = mx::to_stream(s);
  const int K = x.shape(-1);
  auto t = cuda_threshold(mx::astype(threshold, mx::float32, stream), K, stream);
  std::vector<mx::array> inputs{mx::reshape(x, {K}, stream), t};
  if (stream.device == mx::Device::gpu && mx::cu::is_available()) {
    make_contiguous(inputs, stream);
  }
  return mx::array(
      mx::Shape{K + 1}, mx::int32, std::make_shared<CollectActive>(stream), std::move(inputs));
}

} // namespace spqt
