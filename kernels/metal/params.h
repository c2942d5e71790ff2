// Launch geometry shared by the Metal kernels and their host-side dispatch (dispatch/metal.cpp).
// Plain constexpr so that it compiles both as Metal and as C++.
#pragma once

namespace spqt::metal_params {

constexpr int kSimdSize = 32;

// zigzag_gemv: one threadgroup per (band, split, row of y); each simdgroup walks its own share of the
// active list, kColumnsPerStep entries at a time, with kLanesPerColumn lanes sharing one group's rows.
constexpr int kGemvSimdgroups = 2;
constexpr int kGemvThreads = kGemvSimdgroups * kSimdSize;
constexpr int kLanesPerColumn = 8;
constexpr int kColumnsPerStep = kSimdSize / kLanesPerColumn;

// Threadgroups per band: enough to keep the GPU busy on long active lists, few enough that the second
// (reduction) pass stays negligible. About kGemvEntriesPerSplit entries per threadgroup.
constexpr int kGemvMaxSplits = 8;
constexpr int kGemvEntriesPerSplit = 64;

constexpr int gemv_splits(int max_entries) {
  return max_entries <= kGemvEntriesPerSplit
      ? 1
      : ((max_entries + kGemvEntriesPerSplit - 1) / kGemvEntriesPerSplit > kGemvMaxSplits
             ? kGemvMaxSplits
             : (max_entries + kGemvEntriesPerSplit - 1) / kGemvEntriesPerSplit);
}

// zigzag_gemv_reduce and copy_to_contiguous: one element per thread.
constexpr int kElementwiseThreads = 256;

// collect_active: a single threadgroup scans x in chunks of its size, so the list comes out ascending.
// With several rows (batched decode) it lists the union of their active columns, for up to
// kCollectMaxRows rows (their RMSNorm factors are kept in threadgroup memory).
constexpr int kCollectMaxThreads = 1024;
constexpr int kCollectMaxRows = 16;

} // namespace spqt::metal_params
