// Metal dispatch of the primitives (Apple GPUs). Built only where MLX has its Metal backend; elsewhere
// these raise a clear error.
#pragma once

#include "primitives.h"

namespace spqt::metal {

void zigzag_gemv(const ZigzagGemv& p, const std::vector<mx::array>& inputs, mx::array& out);
void collect_active(const CollectActive& p, const std::vector<mx::array>& inputs, mx::array& out);

} // namespace spqt::metal
