// Linked when the extension is built without its CUDA kernels.
#include <stdexcept>

#include "cuda.h"

namespace spqt::cuda {

namespace {
[[noreturn]] void missing(const char* op) {
  throw std::runtime_error(
      std::string("[") + op +
      "] MLX is running on CUDA but this build of spqt_mlx has no CUDA kernels; "
      "reinstall with the [cuda13] extra on a machine with nvcc, or use a CPU stream.");
}
} // namespace

mx::array zigzag_gemv(
    const std::vector<mx::array>&, const mx::Shape&, int, int, ActiveKind, mx::Stream) {
  missing("zigzag_gemv");
}

mx::array collect_active(const mx::array&, const mx::array&, mx::Stream) {
  missing("collect_active");
}

} // namespace spqt::cuda
