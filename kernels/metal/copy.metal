// Strided to row-contiguous copy, for inputs that are views (transposes, broadcasts, slices with
// steps). Copies bit patterns, so one kernel per element size serves every dtype.
#include "params.h"
#include "utils.h"

using namespace metal;

template <typename T>
[[kernel]] void copy_to_contiguous(
    const device T* src [[buffer(0)]],
    device T* dst [[buffer(1)]],
    const constant int* shape [[buffer(2)]],
    const constant int64_t* strides [[buffer(3)]],
    const constant int& ndim [[buffer(4)]],
    const constant int64_t& size [[buffer(5)]],
    uint index [[thread_position_in_grid]]) {
  if (int64_t(index) >= size) {
    return;
  }
  int64_t rest = index;
  int64_t offset = 0;
  for (int d = ndim - 1; d >= 0; --d) {
    offset += (rest % shape[d]) * strides[d];
    rest /= shape[d];
  }
  dst[index] = src[offset];
}

instantiate_kernel("copy_to_contiguous_16", copy_to_contiguous, uint16_t)
instantiate_kernel("copy_to_contiguous_32", copy_to_contiguous, uint32_t)
