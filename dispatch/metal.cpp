#include "metal.h"

#include <stdexcept>

namespace spqt::metal {

#ifndef _METAL_

void zigzag_gemv(const ZigzagGemv&, const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "[zigzag_gemv] this build of spqt_mlx has no kernels for this GPU backend; "
      "use a CPU stream or rebuild with its kernels.");
}

void collect_active(const CollectActive&, const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "[collect_active] this build of spqt_mlx has no kernels for this GPU backend; "
      "use a CPU stream or rebuild with its kernels.");
}

#endif

} // namespace spqt::metal
