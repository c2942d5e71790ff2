// CUDA dispatch. The kernels (kernels/cuda) are compiled ahead of time into one small cubin per
// instantiation, embedded in the extension, and launched as MLX precompiled-kernel nodes, so they
// run inside MLX's CUDA graph on MLX's device memory pool.
#pragma once

#include "mlx/array.h"

#include "ops.h"

namespace spqt::cuda {

mx::array zigzag_gemv(
    const std::vector<mx::array>& inputs,
    const mx::Shape& out_shape,
    int group_size,
    int bits,
    ActiveKind kind,
    mx::Stream s);

mx::array collect_active(const mx::array& x, const mx::array& threshold, mx::Stream s);

} // namespace spqt::cuda
