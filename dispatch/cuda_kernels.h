// The CUDA kernel binaries embedded by the build (cmake/embed_binaries.cmake generates the table).
#pragma once

#include <cstddef>
#include <string>

namespace spqt::cuda {

struct EmbeddedKernel {
  const char* name;
  const unsigned char* data;
  size_t size;
};

const EmbeddedKernel* find_embedded_kernel(const std::string& name);

} // namespace spqt::cuda
