// Small helpers shared by the Metal kernels.
#pragma once

#include <metal_stdlib>

// The address space of a threadgroup-memory pointer passed to a helper function. (The test emulator
// defines it away: there `threadgroup` itself is a storage class, which a parameter cannot have.)
#ifndef SPQT_THREADGROUP_PARAM
#define SPQT_THREADGROUP_PARAM threadgroup
#endif

// Instantiates func<...> as a kernel with an explicit host name, the name dispatch/metal.cpp looks up
// (kernel_names.h). The test emulator defines its own version, which registers the name instead.
#ifndef instantiate_kernel
#define instantiate_kernel(name, func, ...) \
  template [[host_name(name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;
#endif
