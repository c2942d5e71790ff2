// What the Metal host code decides, in plain C++: kernel names, buffer and constant slots, grid and
// threadgroup sizes, split counts and workspace sizes. Two encoders run it:
//  * dispatch/metal.cpp, through a thin adapter over MLX's Metal command encoder (on a Mac);
//  * the emulator tests (tests/metal/emulator/harness.cpp), through a fake that records each
//    dispatch and runs it on the SIMT emulator with the buffers as bound here,
// so a wrong slot, size or split in this file fails the emulated tests.
//
// An encoder `E` provides:
//   using Buffer = ...;                                  // a handle to device memory
//   Buffer temporary(int64_t elements, Element type);    // workspace alive until the work completes
//   void set_kernel(const std::string& name);            // the pipeline for the next dispatch
//   int max_threads_per_threadgroup();                   // of that pipeline
//   void set_input(const Buffer&, int slot);             // [[buffer(slot)]] the kernel reads
//   void set_output(const Buffer&, int slot);            // [[buffer(slot)]] the kernel writes
//   void set_int(int32_t, int slot);                     // constant int&
//   void set_int64(int64_t, int slot);                   // constant int64_t&
//   void set_ints(const std::vector<int32_t>&, int slot);
//   void set_int64s(const std::vector<int64_t>&, int slot);
//   void set_float(float, int slot);                     // constant float&
//   void dispatch(Size3 threadgroups, Size3 threads_per_threadgroup);
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "../kernels/contract.h"
#include "../kernels/metal/kernel_names.h"
#include "../kernels/metal/params.h"

namespace spqt::metal {

struct Size3 {
  int64_t x = 1, y = 1, z = 1;
};

// Element types of the workspaces the encoding asks for.
enum class Element { Float32, Int32 };

inline Size3 groups_for(int64_t elements, int threads) {
  return {(elements + threads - 1) / threads, 1, 1};
}

// Copies a strided view (element `strides`, possibly negative or zero, first element at `src`)
// into the row-contiguous `out`. Elements are moved by bit pattern: 2 or 4 bytes.
template <class E>
void encode_copy_to_contiguous(E& e, const typename E::Buffer& src, const typename E::Buffer& out, int itemsize,
                               const std::vector<int32_t>& shape, const std::vector<int64_t>& strides) {
  using namespace metal_params;
  if (itemsize != 2 && itemsize != 4) {
    throw std::invalid_argument("[spqt] unexpected element size for a Metal input.");
  }
  int64_t size = 1;
  for (int32_t n : shape) {
    size *= n;
  }
  e.set_kernel(metal_kernels::copy_to_contiguous(itemsize));
  e.set_input(src, 0);
  e.set_output(out, 1);
  e.set_ints(shape, 2);
  e.set_int64s(strides, 3);
  e.set_int(int32_t(shape.size()), 4);
  e.set_int64(size, 5);
  e.dispatch(groups_for(size, kElementwiseThreads), {kElementwiseThreads, 1, 1});
}

// The prologue of a fused product (kernels/contract.h) as the kernels take it: its kind, the norm
// weight (RMSNorm only) and epsilon.
template <class Buffer>
struct PrologueArgs {
  Prologue kind = Prologue::Identity;
  std::optional<Buffer> norm;
  float eps = 0.0f;
};

// out (K + 1,) int32 = [n, ascending active k..., unspecified...] for x of K elements of `type`
// ("float32", "float16", "bfloat16"), or of x' after a prologue (x then holds 2K for SwiGLU);
// `threshold` holds one float32, or K when `per_column`. `threads` > 0 overrides the threadgroup
// size (tests exercise other sizes with it). x of several rows (at most kCollectMaxRows) lists the
// union of their active columns.
template <class E>
void encode_collect(E& e, const typename E::Buffer& x, const typename E::Buffer& threshold,
                    const typename E::Buffer& out, const std::string& type, int K, bool per_column,
                    int threads = 0, const PrologueArgs<typename E::Buffer>& prologue = {}, int rows = 1) {
  using namespace metal_params;
  if (rows < 1 || rows > kCollectMaxRows) {
    throw std::invalid_argument("[spqt] collect_active takes 1 to " + std::to_string(kCollectMaxRows) + " rows.");
  }
  e.set_kernel(metal_kernels::collect_active(type));
  if (threads <= 0) {
    // One threadgroup scans x in chunks of its size: as large as the pipeline allows, in whole
    // simdgroups, and no larger than x needs.
    const int max_threads = std::min(kCollectMaxThreads, e.max_threads_per_threadgroup()) / kSimdSize * kSimdSize;
    threads = std::min(max_threads, (K + kSimdSize - 1) / kSimdSize * kSimdSize);
  }
  e.set_input(x, 0);
  e.set_input(threshold, 1);
  e.set_output(out, 2);
  e.set_int(K, 3);
  e.set_int(per_column ? 1 : 0, 4);
  e.set_input(prologue.norm ? *prologue.norm : x, 5);  // read only by the RMSNorm prologue
  e.set_int(int(prologue.kind), 6);
  e.set_float(prologue.eps, 7);
  e.set_int(rows, 8);
  e.dispatch({1, 1, 1}, {threads, 1, 1});
}

// A second set of experts' weights (gate and up as one product): stacked as the first set, its bands
// fill the bands of y from `first_bands` on, from the same x' and active columns.
template <class Buffer>
struct SecondExperts {
  Buffer w, scales, biases;
  int first_bands;  // bands of y from the first set (its w's second dimension)
};

// The experts of a gathered product (mixture of experts): row m of y is row m / x_div of x times the
// weight of expert ids[m]; w, scales and biases hold `count` weights of (N / gs, K, ...) one after
// another (of (first_bands, K, ...) with a second set). An id not below `count`, read as unsigned,
// makes its row 0 and reads no weight.
template <class Buffer>
struct Experts {
  Buffer ids;  // int32 or uint32 (M,)
  int count;
  int x_div;   // rows of y per row of x: the experts of one token share its input
  std::optional<SecondExperts<Buffer>> second = std::nullopt;
};

// The operands of one zigzag GEMV: y (M, N) = x (M, K) @ W.T over the active columns.
template <class Buffer>
struct Gemv {
  std::string type;  // of x, scales, biases and y: "float32", "float16" or "bfloat16"
  int bits, group_size;
  int M, N, K;
  ActiveKind kind;
  Buffer x, w, scales, biases, y;
  // Indices: the int32 list (`active_len` entries); Packed: the (K + 1,) list; Threshold: float32
  // thresholds (`active_len` 1 or K). Unused for Dense.
  std::optional<Buffer> active;
  int active_len = 0;
  int splits = 0;  // > 0 overrides the split policy (tests exercise other geometries with it)
  // A fused product: x is read through the prologue (x then holds M rows of 2K for SwiGLU), and the
  // residual (M, N) is added to y.
  PrologueArgs<Buffer> prologue = {};
  std::optional<Buffer> residual = std::nullopt;
  // A gathered product: x holds M / x_div rows; the kind is Dense or Threshold, whose float32
  // thresholds are then one per expert (`active_len` = count) or one for all (1).
  std::optional<Experts<Buffer>> experts = std::nullopt;
};

template <class E>
void encode_gemv(E& e, const Gemv<typename E::Buffer>& g) {
  using namespace metal_params;
  using Buffer = typename E::Buffer;
  // The active list the kernel walks. listed >= 0: a plain list of that length; < 0: count-prefixed.
  // A threshold is collected on the device into a workspace list first: no host round-trip. Several
  // rows walk the union of their columns (every column past kCollectMaxRows rows), each row keeping
  // its own entries.
  std::optional<Buffer> list;
  int listed = 0;
  const bool gathered = g.experts.has_value();
  if (gathered) {
    if (g.kind != ActiveKind::Dense && g.kind != ActiveKind::Threshold) {
      throw std::invalid_argument("[spqt] a gathered zigzag GEMV takes every column or per-expert thresholds.");
    }
    if (g.experts->x_div < 1 || g.M % g.experts->x_div) {
      throw std::invalid_argument("[spqt] a gathered zigzag GEMV needs a whole number of rows of y per row of x.");
    }
    if (g.kind == ActiveKind::Threshold && g.active_len != 1 && g.active_len != g.experts->count) {
      throw std::invalid_argument("[spqt] a gathered zigzag GEMV takes one threshold per expert, or one.");
    }
    const auto& second = g.experts->second;
    if (second && (second->first_bands < 0 || second->first_bands > g.N / g.group_size)) {
      throw std::invalid_argument(
          "[spqt] a gathered zigzag GEMV takes 0 to N / group_size bands from its first set of experts.");
    }
  }
  // A gathered product walks every column: its rows' experts have thresholds of their own.
  const bool rows_thresholded = g.kind == ActiveKind::Threshold && (g.M > 1 || gathered);
  switch (g.kind) {
    case ActiveKind::Dense:
      break;
    case ActiveKind::Indices:
      list = g.active;
      listed = g.active_len;
      break;
    case ActiveKind::Packed:
      list = g.active;
      listed = -1;
      break;
    case ActiveKind::Threshold:
      if (g.active && g.M <= kCollectMaxRows && !gathered) {
        list = e.temporary(int64_t(g.K) + 1, Element::Int32);
        encode_collect(e, g.x, *g.active, *list, g.type, g.K, g.active_len != 1, 0, g.prologue, g.M);
        listed = -1;
      }
      break;
  }
  if (g.kind != ActiveKind::Dense && !g.active) {
    throw std::invalid_argument("[spqt] a sparse zigzag GEMV needs its active columns.");
  }
  const bool sparse = list.has_value();

  // Split the walk over several threadgroups per band when it is long, then add the partials.
  const int splits = g.splits > 0 ? g.splits : gemv_splits(g.kind == ActiveKind::Indices ? listed : g.K);
  std::optional<Buffer> partials;
  if (splits > 1) {
    partials = e.temporary(int64_t(g.M) * splits * g.N, Element::Float32);
  }

  e.set_kernel(metal_kernels::zigzag_gemv(sparse, g.type, g.bits, g.group_size));
  e.set_input(g.x, 0);
  e.set_input(g.w, 1);
  e.set_input(g.scales, 2);
  e.set_input(g.biases, 3);
  // Unused slots (dense walk, empty list, single split) are bound to a valid buffer all the same.
  const bool has_list = list && !(g.kind == ActiveKind::Indices && listed == 0);
  e.set_input(has_list ? *list : g.x, 4);
  e.set_output(g.y, 5);
  e.set_output(partials ? *partials : g.y, 6);
  e.set_int(g.K, 7);
  e.set_int(g.N, 8);
  e.set_int(listed, 9);
  // Slots the product reads only when fused are bound to a valid buffer all the same.
  e.set_input(g.prologue.norm ? *g.prologue.norm : g.x, 10);
  e.set_input(g.residual ? *g.residual : g.x, 11);
  e.set_int(int(g.prologue.kind), 12);
  e.set_float(g.prologue.eps, 13);
  e.set_int(g.residual && splits == 1 ? 1 : 0, 14);
  e.set_input(rows_thresholded ? *g.active : g.x, 15);  // read only when the rows keep their own entries
  e.set_int(rows_thresholded ? (g.active_len != 1 && !gathered ? 1 : 0) : -1, 16);
  // A plain product binds the gather's slots to valid buffers all the same (n_experts -1: not gathered).
  e.set_input(gathered ? g.experts->ids : g.x, 17);
  e.set_int(gathered ? g.experts->x_div : 1, 18);
  e.set_int(gathered ? g.experts->count : -1, 19);
  e.set_int(gathered && rows_thresholded && g.active_len != 1 ? 1 : 0, 20);  // one threshold per expert
  // A single set of weights binds it again as the second, whose bands then start past y's last.
  const auto& second = gathered ? g.experts->second : std::nullopt;
  e.set_input(second ? second->w : g.w, 21);
  e.set_input(second ? second->scales : g.scales, 22);
  e.set_input(second ? second->biases : g.biases, 23);
  e.set_int(second ? second->first_bands : g.N / g.group_size, 24);
  e.dispatch({g.N / g.group_size, splits, g.M}, {kGemvThreads, 1, 1});

  if (splits > 1) {
    // Second pass: add the per-split partials in a fixed order (deterministic results).
    const int size = g.M * g.N;
    e.set_kernel(metal_kernels::zigzag_gemv_reduce(g.type));
    e.set_input(*partials, 0);
    e.set_output(g.y, 1);
    e.set_int(g.N, 2);
    e.set_int(splits, 3);
    e.set_int(size, 4);
    e.set_input(g.residual ? *g.residual : *partials, 5);
    e.set_int(g.residual ? 1 : 0, 6);
    e.dispatch(groups_for(size, kElementwiseThreads), {kElementwiseThreads, 1, 1});
  }
}

} // namespace spqt::metal
