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

void zigzag_gemv(ZigzagGemv&, const std::vector<mx::array>&, mx::array&) {
  missing("zigzag_gemv");
}

bool folds(int, int, int, int, ActiveKind, Prologue, int) {
  return true;  // the product itself reports the missing kernels
}

void zigzag_gather_gemv(ZigzagGatherGemv&, const std::vector<mx::array>&, mx::array&) {
  missing("zigzag_gather_gemv");
}

bool gather_collects(int) {
  return true;  // the product itself reports the missing kernels
}

void zigzag_matmul(ZigzagMatmul&, const std::vector<mx::array>&, mx::array&) {
  missing("zigzag_matmul");
}

bool matmul_runs(mx::Dtype, int) {
  return true;  // the product itself reports the missing kernels
}

void collect_active(CollectActive&, const std::vector<mx::array>&, mx::array&) {
  missing("collect_active");
}

} // namespace spqt::cuda
