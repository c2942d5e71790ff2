// The op contract in one place: the kinds of active set and the supported formats. Included by the
// dispatch (dispatch/ops.h), the CUDA kernels and, through the bindings, visible to Python
// (spqt_mlx._ext.ActiveKind, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES); kernels/cuda/instances.py reads
// the formats from this file for the build.
#pragma once

namespace spqt {

// How the active input columns of a zigzag GEMV are given. Kernels receive it as an int.
enum class ActiveKind : int {
  Dense = 0,      // every column
  Indices = 1,    // int32 list of column indices; its length is the count
  Packed = 2,     // int32 (K + 1,): [n, idx_0, ..., idx_{n-1}, unspecified...]
  Threshold = 3,  // float32 () or (K,): columns with |x| > threshold, collected inside the kernel
};

// What a zigzag GEMV does to x before the product (kernels receive it as an int). The decoder block
// around a projection reads x through it, so one launch replaces a norm or activation kernel, its
// output in global memory and the product; the active set is decided on the transformed x.
enum class Prologue : int {
  Identity = 0, // x itself
  RmsNorm = 1,  // x * rsqrt(mean(x^2) + eps) * norm_weight, per row (the norm before q/k/v, gate/up)
  SwiGLU = 2,   // silu(x[:K]) * x[K:], x of 2K columns per row (gate and up, stacked, before down)
};

// Formats the kernels are instantiated for.
constexpr int kSupportedBits[] = {2, 3, 4, 5, 6, 8};
constexpr int kSupportedGroupSizes[] = {32, 64, 128};
// The formats the CUDA tensor-core GEMV (kernels/cuda/zigzag_gemv_mma.cu) reads.
constexpr int kTensorCoreBits[] = {4};
constexpr int kTensorCoreGroupSizes[] = {64, 128};

} // namespace spqt
