// What the CUDA dispatch needs from the CUDA driver, beyond MLX's command encoder: the embedded
// kernels as CUfunctions, and device memory for outputs and workspaces.
//
// The driver is reached through libcuda.so.1, which MLX has already loaded, so the extension links
// no CUDA library and imports on machines without one.
#pragma once

#include <cstddef>
#include <string>

#include <cuda.h>

#include "mlx/array.h"
#include "mlx/backend/cuda/device.h"

#include "ops.h"

namespace spqt::cuda {

// The kernel `name` from the embedded binaries, loaded into the encoder's device once.
CUfunction kernel(const std::string& name, mx::cu::CommandEncoder& encoder);

// Number of multiprocessors of the encoder's device.
int multiprocessor_count(mx::cu::CommandEncoder& encoder);

// The encoder's device's compute capability as 10 * major + minor (90 for Hopper).
int compute_capability(mx::cu::CommandEncoder& encoder);

// Gives `a` `bytes` of device memory (not managed memory) from the device's stream-ordered pool,
// recycled per size once MLX drops the array, which it does after the GPU work that used it has
// completed. With `zeroed`, the memory holds zeros and must hold zeros again when the array is
// dropped (the kernels reset the counters they use).
void allocate(mx::array& a, size_t bytes, mx::cu::CommandEncoder& encoder, bool zeroed = false);

} // namespace spqt::cuda
