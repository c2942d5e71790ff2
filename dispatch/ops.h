// Op functions of spqt_mlx, in the style of mlx/ops.h: they validate, build the graph node and pick
// the backend. Nothing is computed here.
#pragma once

#include <functional>
#include <optional>

#include "mlx/array.h"
#include "mlx/utils.h"

#include "kernels/contract.h"

namespace spqt {

namespace mx = mlx::core;

// The neighbours of a product that a decoder block folds into it: a prologue applied to x
// (kernels/contract.h) and a residual added to y. The default folds nothing.
struct Fusion {
  Prologue prologue = Prologue::Identity;
  std::optional<mx::array> norm_weight;  // (K,): the RMSNorm's weight (RmsNorm only)
  float eps = 0.0f;                      // the RMSNorm's epsilon (RmsNorm only)
  std::optional<mx::array> residual;     // shaped like y: y = residual + x' @ W.T

  bool any() const {
    return prologue != Prologue::Identity || residual.has_value();
  }
};

// y = residual + x' @ W.T for the zigzag-quantized W = (w, scales, biases), restricted to the
// active columns, where x' is x after the fusion's prologue (x itself without one) and the active
// set is decided on x'. x' is rounded to x's dtype, as an unfused norm or activation would write it.
// With the Threshold kind x may hold several rows (batched decode): each row takes its own columns
// with |x'| > threshold, and the kernels read the union of the rows' columns once for them all.
mx::array zigzag_gemv(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    const std::optional<mx::array>& active,
    ActiveKind kind,
    int group_size,
    int bits,
    const Fusion& fusion = {},
    mx::StreamOrDevice s = {});

// Dense y = x @ W.T for any number of rows of x (..., K): the product of prefill. CUDA runs float16
// and bfloat16 on the tensor cores straight from the zigzag layout; elsewhere, and for float32,
// the product is composed of MLX ops (dispatch/ops.cpp says which).
mx::array zigzag_matmul(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size,
    int bits,
    mx::StreamOrDevice s = {});

// A second set of stacked experts for zigzag_gather_gemv: (w, scales, biases) as the first's.
struct SecondExperts {
  mx::array w, scales, biases;
};

// The experts' product of a mixture-of-experts layer: row r of the result is x's row r / (R / R_x)
// times W[experts[r]].T, for the stacked zigzag weights of E experts (w (E, N/group_size, K, words),
// scales and biases (E, N/group_size, K)). x holds R_x rows (..., K); experts (any integer shape, R
// entries) is a multiple of them: consecutive entries share one row of x, as the k experts a token
// is routed to share its input. With a threshold (a scalar, or (E,): one per expert) each row reads
// only the columns with |x'| > its expert's threshold, collected inside the kernel. The SwiGLU
// prologue reads x' = silu(gate) * up from x of 2K columns (gate, then up); a `second` set of
// experts adds its rows after the first's in every output row, from the same x' and active set
// (gate and up as one product, whose output feeds the down product's SwiGLU). The result has shape
// experts.shape + (N,); a row whose expert lies outside [0, E) is 0.
mx::array zigzag_gather_gemv(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    const mx::array& experts,
    const std::optional<mx::array>& threshold,
    int group_size,
    int bits,
    Prologue prologue = Prologue::Identity,
    const std::optional<SecondExperts>& second = std::nullopt,
    mx::StreamOrDevice s = {});

// A fused product as MLX ops: `fusion`'s prologue applied to x, `product` (the plain product of x'),
// then the residual added. For gradients, and for the CUDA products that cannot fold their
// neighbours. `fusion` must be checked (zigzag_gemv does that).
mx::array unfolded(
    const Fusion& fusion,
    const mx::array& x,
    const std::function<mx::array(const mx::array&)>& product,
    mx::StreamOrDevice s = {});

// x' of a fused product, with MLX ops: what the kernels compute on the fly.
mx::array apply_prologue(
    const mx::array& x,
    Prologue prologue,
    const std::optional<mx::array>& norm_weight,
    float eps,
    mx::StreamOrDevice s = {});

// Count-prefixed, ascending list of the columns k with |x[k]| > threshold[k] (threshold: () or (K,)).
mx::array collect_active(
    const mx::array& x,
    const mx::array& threshold,
    mx::StreamOrDevice s = {});

// The checks of collect_active alone, for callers that build the collection only when needed.
void check_collect_active(const mx::array& x, const mx::array& threshold);

} // namespace spqt
