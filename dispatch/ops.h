// Op functions of spqt_mlx, in the style of mlx/ops.h: they validate, build the graph node and pick
// the backend. Nothing is computed here.
#pragma once

#include <optional>

#include "mlx/array.h"
#include "mlx/utils.h"

#include "kernels/contract.h"

namespace spqt {

namespace mx = mlx::core;

// y = x @ W.T for the zigzag-quantized W = (w, scales, biases), restricted to the active columns.
mx::array zigzag_gemv(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    const std::optional<mx::array>& active,
    ActiveKind kind,
    int group_size,
    int bits,
    mx::StreamOrDevice s = {});

// Count-prefixed, ascending list of the columns k with |x[k]| > threshold[k] (threshold: () or (K,)).
mx::array collect_active(
    const mx::array& x,
    const mx::array& threshold,
    mx::StreamOrDevice s = {});

// The checks of collect_active alone, for callers that build the collection only when needed.
void check_collect_active(const mx::array& x, const mx::array& threshold);

} // namespace spqt
