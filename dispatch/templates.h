// Maps the run-time (bits, group_size) pair onto the kernels' template arguments, for every format
// the contract (kernels/contract.h) lists.
#pragma once

#include <stdexcept>
#include <utility>

#include "kernels/contract.h"

namespace spqt {

template <int BITS, typename F, size_t... I>
void dispatch_group_size(int group_size, F&& f, std::index_sequence<I...>) {
  const bool found = ((group_size == kSupportedGroupSizes[I] &&
                       (f.template operator()<BITS, kSupportedGroupSizes[I]>(), true)) || ...);
  if (!found) {
    throw std::invalid_argument("[spqt] unsupported group size.");
  }
}

template <typename F, size_t... I>
void dispatch_bits(int bits, int group_size, F&& f, std::index_sequence<I...>) {
  constexpr auto sizes = std::make_index_sequence<std::size(kSupportedGroupSizes)>();
  const bool found = ((bits == kSupportedBits[I] &&
                       (dispatch_group_size<kSupportedBits[I]>(group_size, f, sizes), true)) || ...);
  if (!found) {
    throw std::invalid_argument("[spqt] unsupported number of bits.");
  }
}

template <typename F>
void dispatch_bits_group_size(int bits, int group_size, F&& f) {
  dispatch_bits(bits, group_size, f, std::make_index_sequence<std::size(kSupportedBits)>());
}

} // namespace spqt
