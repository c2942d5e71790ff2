// Host names of the Metal kernels, as instantiated in the .metal files. Host-side C++ only: used by
// dispatch/metal.cpp and by the test emulator, so a name that drifts fails the test suite.
#pragma once

#include <string>

namespace spqt::metal_kernels {

// type: "float32", "float16" or "bfloat16".
inline std::string zigzag_gemv(bool sparse, const std::string& type, int bits, int group_size) {
  return std::string("zigzag_gemv_") + (sparse ? "sparse_" : "dense_") + type + "_b" +
      std::to_string(bits) + "_gs" + std::to_string(group_size);
}

inline std::string zigzag_gemv_reduce(const std::string& type) {
  return "zigzag_gemv_reduce_" + type;
}

inline std::string collect_active(const std::string& type) {
  return "collect_active_" + type;
}

// Copies by bit pattern, so one kernel per element size in bytes (2 or 4).
inline std::string copy_to_contiguous(int itemsize) {
  return "copy_to_contiguous_" + std::to_string(itemsize * 8);
}

} // namespace spqt::metal_kernels
