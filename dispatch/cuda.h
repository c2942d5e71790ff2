// CUDA dispatch of the primitives. The kernels (kernels/cuda) are compiled ahead of time into one
// small fatbin per instantiation, embedded in the extension, loaded once per process through the
// CUDA driver and launched from the primitives' eval_gpu as one node of MLX's CUDA graph.
#pragma once

#include "primitives.h"

namespace spqt::cuda {

void zigzag_gemv(ZigzagGemv& p, const std::vector<mx::array>& inputs, mx::array& out);
// Whether the kernels fold a prologue or residual into this product (the op function otherwise
// runs them as MLX ops around a plain one).
bool folds(int bits, int group_size, int N, int K, ActiveKind kind, Prologue prologue, int rows);
void zigzag_gather_gemv(ZigzagGatherGemv& p, const std::vector<mx::array>& inputs, mx::array& out);
// Whether the kernels collect a gathered product's active sets themselves (else the op zeroes the
// inactive entries with MLX ops and runs a dense product).
bool gather_collects(int K);
void zigzag_matmul(ZigzagMatmul& p, const std::vector<mx::array>& inputs, mx::array& out);
// Whether zigzag_matmul of x with this dtype and number of rows runs the tensor-core kernel (else
// the op dequantizes the weight into a transient copy for one batched matmul).
bool matmul_runs(mx::Dtype dtype, int rows);
void collect_active(CollectActive& p, const std::vector<mx::array>& inputs, mx::array& out);

} // namespace spqt::cuda
