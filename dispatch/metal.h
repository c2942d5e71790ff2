// Metal dispatch of the primitives (Apple GPUs). Built only where MLX has its Metal backend; elsewhere
// these raise a clear error.
#pragma once

#include "primitives.h"

namespace spqt::metal {

// Non-const: the primitive's stream() accessor is.
void zigzag_gemv(ZigzagGemv& p, const std::vector<mx::array>& inputs, mx::array& out);
void zigzag_gather_gemv(ZigzagGatherGemv& p, const std::vector<mx::array>& inputs, mx::array& out);
void collect_active(CollectActive& p, const std::vector<mx::array>& inputs, mx::array& out);

} // namespace spqt::metal
