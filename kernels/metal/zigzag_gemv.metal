// Kernel instantiations of zigzag_gemv.h: every activation type x bits x group size, for the dense
// walk over [0, K) and the sparse walk over an active list.
#include "zigzag_gemv.h"

#define instantiate_zigzag_gemv(tname, type, bits, gs)                                   \
  instantiate_kernel(                                                                   \
      "zigzag_gemv_dense_" #tname "_b" #bits "_gs" #gs, zigzag_gemv, type, bits, gs, false) \
  instantiate_kernel(                                                                   \
      "zigzag_gemv_sparse_" #tname "_b" #bits "_gs" #gs, zigzag_gemv, type, bits, gs, true)

#define instantiate_zigzag_gemv_group_sizes(tname, type, bits) \
  instantiate_zigzag_gemv(tname, type, bits, 32)               \
  instantiate_zigzag_gemv(tname, type, bits, 64)               \
  instantiate_zigzag_gemv(tname, type, bits, 128)

#define instantiate_zigzag_gemv_type(tname, type)             \
  instantiate_zigzag_gemv_group_sizes(tname, type, 2)         \
  instantiate_zigzag_gemv_group_sizes(tname, type, 3)         \
  instantiate_zigzag_gemv_group_sizes(tname, type, 4)         \
  instantiate_zigzag_gemv_group_sizes(tname, type, 5)         \
  instantiate_zigzag_gemv_group_sizes(tname, type, 6)         \
  instantiate_zigzag_gemv_group_sizes(tname, type, 8)         \
  instantiate_kernel("zigzag_gemv_reduce_" #tname, zigzag_gemv_reduce, type)

instantiate_zigzag_gemv_type(float32, float)
instantiate_zigzag_gemv_type(float16, half)
instantiate_zigzag_gemv_type(bfloat16, bfloat)
