// MLX's CUDA backend headers include <fmt/format.h>, which the mlx wheels do not ship. The parts
// of those headers the dispatch uses need only this declaration.
#pragma once

#include <string>

namespace fmt {
template <typename... Args>
std::string format(Args&&...);
} // namespace fmt
