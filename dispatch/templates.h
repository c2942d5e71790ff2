// Maps the run-time (bits, group_size) pair onto the kernels' template arguments.
#pragma once

#include <stdexcept>

namespace spqt {

template <int BITS, typename F>
void dispatch_group_size(int group_size, F&& f) {
  switch (group_size) {
    case 32:
      return f.template operator()<BITS, 32>();
    case 64:
      return f.template operator()<BITS, 64>();
    case 128:
      return f.template operator()<BITS, 128>();
  }
  throw std::invalid_argument("[spqt] unsupported group size.");
}

template <typename F>
void dispatch_bits_group_size(int bits, int group_size, F&& f) {
  switch (bits) {
    case 2:
      return dispatch_group_size<2>(group_size, f);
    case 3:
      return dispatch_group_size<3>(group_size, f);
    case 4:
      return dispatch_group_size<4>(group_size, f);
    case 5:
      return dispatch_group_size<5>(group_size, f);
    case 6:
      return dispatch_group_size<6>(group_size, f);
    case 8:
      return dispatch_group_size<8>(group_size, f);
  }
  throw std::invalid_argument("[spqt] unsupported number of bits.");
}

} // namespace spqt
