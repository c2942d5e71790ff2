// A small SIMT emulator for Metal compute kernels (test-only).
//
// Every thread of a threadgroup runs as a cooperative fiber (ucontext). A fiber runs until it reaches
// a threadgroup barrier or a simdgroup collective, or returns; then the scheduler resumes another
// ready fiber: the highest thread index (seed 0) or a random one (any other seed). A collective
// releases as soon as every live lane of its simdgroup waits at it, so a simdgroup may race ahead of
// the others; a barrier releases only when every thread of the threadgroup waits at one.
// Threadgroup memory is poisoned (0xff bytes: NaN, -1) before each threadgroup starts, so a missing
// barrier reads poison or stale data, and a divergent barrier or collective is reported instead of
// passing. Threadgroups run one after another, in reversed or shuffled order.
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <typeindex>
#include <typeinfo>

#include "metal_types.h"

namespace simt {

constexpr int kSimdSize = 32;
constexpr int kSlotBytes = 64;

// The built-in kernel arguments of one thread.
struct ThreadIds {
  uint3 tg;          // threadgroup_position_in_grid
  uint3 tgs;         // threadgroups_per_grid
  uint tid;          // thread_index_in_threadgroup
  uint threads;      // threads_per_threadgroup
  uint sg;           // simdgroup_index_in_threadgroup
  uint simdgroups;   // simdgroups_per_threadgroup
  uint lane;         // thread_index_in_simdgroup
  uint gid;          // thread_position_in_grid (x), for one-dimensional grids
};

// Runs body(ids) for every thread of a grid of `grid` threadgroups of `threads` threads.
// seed 0 schedules in reverse order, any other seed shuffles. Throws std::runtime_error on a
// divergent barrier or collective, or a deadlock.
void launch(uint3 grid, uint threads, uint64_t seed, const std::function<void(const ThreadIds&)>& body);

// ---- called from kernel code (metal_compat.h) ----
const ThreadIds& self();
void threadgroup_barrier();
[[noreturn]] void fail(const std::string& what);

// Values the lanes of a simdgroup exchange in one collective.
struct SimdSlots {
  alignas(16) unsigned char data[kSimdSize][kSlotBytes];
  const char* op[kSimdSize];
  bool present[kSimdSize]; // lanes taking part (set when the collective releases)
};
SimdSlots& simd_slots();
void simd_sync(); // waits until every live lane of the simdgroup waits here

// Deposits v, waits for the simdgroup, returns combine(lane, present, value_of_lane), waits again
// so that no lane overwrites its slot before every lane has read.
template <typename V, typename Combine>
V simd_collective(const char* op, const V& v, Combine&& combine) {
  static_assert(sizeof(V) <= kSlotBytes, "value too large for a simd slot");
  SimdSlots& s = simd_slots();
  const uint lane = self().lane;
  std::memcpy(s.data[lane], &v, sizeof(V));
  s.op[lane] = op;
  simd_sync();
  for (int l = 0; l < kSimdSize; ++l) {
    if (s.present[l] && std::strcmp(s.op[l], op) != 0) {
      fail(std::string("lanes of one simdgroup call different collectives: ") + op + " and " + s.op[l]);
    }
  }
  auto value = [&](int l) {
    V t;
    std::memcpy(&t, s.data[l], sizeof(V));
    return t;
  };
  V out = combine(int(lane), s.present, value);
  simd_sync();
  return out;
}

// ---- kernel registry: instantiate_kernel (metal_compat.h) registers host names here ----
bool register_kernel(const char* name, void* fn, std::type_index type);
void* find_kernel(const std::string& name, std::type_index type);

template <typename Fn>
Fn kernel(const std::string& name) {
  return reinterpret_cast<Fn>(find_kernel(name, typeid(Fn)));
}

} // namespace simt
