// The op contract in one place: the kinds of active set and the supported formats. Included by the
// dispatch (dispatch/ops.h), the CUDA kernels and, through the bindings, visible to Python
// (spqt_mlx._ext.ActiveKind, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES); kernels/cuda/instances.py reads
// the formats from this file for the build.
#pragma once

// The functions below are called by the CUDA kernels too.
#ifdef __CUDACC__
#define SPQT_HOST_DEVICE __host__ __device__
#else
#define SPQT_HOST_DEVICE
#endif

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

// Rows of x that one pass of the tensor-core GEMV multiplies: the MMA's 8 columns hold every row's
// x * scale as bf16 terms whose sum keeps the product's precision, two for 16-bit x and three for
// float32 (kernels/cuda/zigzag_gemv_mma.cu).
SPQT_HOST_DEVICE constexpr int tensor_core_terms(int itemsize) {
  return itemsize == 4 ? 3 : 2;
}
SPQT_HOST_DEVICE constexpr int tensor_core_rows(int itemsize) {
  return 8 / tensor_core_terms(itemsize);
}

// Threads per block of the CUDA bulk-copy GEMV (kernels/cuda/zigzag_gemv_bulk.cu): eight warps
// that run the MMAs and one that issues the copies.
constexpr int kBulkThreads = 9 * 32;

// The CUDA zigzag matmul's tile (kernels/cuda/zigzag_matmul.cu): rows of x by output columns per
// block, which the dispatch's grid follows.
constexpr int kMatmulTileRows = 64;
constexpr int kMatmulTileColumns = 128;

} // namespace spqt
