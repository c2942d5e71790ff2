// Which orderings compute-sanitizer's racecheck accepts between Hopper bulk copies into shared
// memory (cp.async.bulk completing on an mbarrier) and the threads that read what they wrote: the
// question behind zigzag_gemv_bulk.cu's per-lane arrivals (BENCHMARKS.md, 2026-11-29). Every mode
// checks its sum; run each under racecheck and compare the hazards reported:
//
//   nvcc -O2 -arch=sm_90 -lineinfo -o racecheck_probe benchmarks/racecheck_probe.cu
//   for m in 0 1 2 3 4 5; do ./racecheck_probe $m; compute-sanitizer --tool racecheck ./racecheck_probe $m | tail -1; done
//
// Modes:
//  0 single:      one bulk copy; every thread waits on its mbarrier, then reads. Correct.
//  1 ring:        a ring of two slots, one producer warp and eight consumer warps, "full" and "empty"
//                 mbarriers; a consumer warp hands a slot back with one arrival (lane 0, after
//                 __syncwarp). Correct by the barriers.
//  2 ring-racy:   as 1, but each consumer warp hands the slot back before reading it, so the producer
//                 may refill a slot while it is read. A real race.
//  3 sync-single: as 0, plus __syncthreads() after the wait. Correct.
//  4 plain:       the producer lane fills the buffer with ordinary stores, arrives on the mbarrier;
//                 the consumers wait, then read. Correct.
//  5 ring-lanes:  as 1, but every consumer lane arrives on "empty" after its own reads (count 8 * 32).
//                 Correct.
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cuda_runtime.h>

__device__ __forceinline__ uint32_t smem(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void binit(uint64_t* b, int c) { asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem(b)), "r"(c) : "memory"); }
__device__ __forceinline__ void arrive(uint64_t* b) { asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem(b)) : "memory"); }
__device__ __forceinline__ void arrive_tx(uint64_t* b, uint32_t n) { asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem(b)), "r"(n) : "memory"); }
__device__ __forceinline__ void wait(uint64_t* b, uint32_t par) {
  asm volatile("{\n.reg .pred d;\nW_%=:\nmbarrier.try_wait.parity.shared::cta.b64 d, [%0], %1;\n@!d bra W_%=;\n}\n" ::"r"(smem(b)), "r"(par) : "memory");
}
__device__ __forceinline__ void bulk(void* dst, const void* src, uint32_t n, uint64_t* b) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem(dst)), "l"(src), "r"(n), "r"(smem(b)) : "memory");
}

constexpr int kStage = 4096;  // floats per stage
constexpr int kRing = 2;
constexpr int kCons = 8;

__global__ void probe(const float* in, float* out, int stages, int mode) {
  __shared__ __align__(128) float buf[kRing][kStage];
  __shared__ __align__(8) uint64_t full[kRing], empty[kRing];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid == 0) {
    for (int i = 0; i < kRing; ++i) { binit(&full[i], 1); binit(&empty[i], mode == 5 ? kCons * 32 : kCons); }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  float acc = 0.f;
  if (mode == 0 || mode == 3 || mode == 4) {
    if (tid == 0) {
      if (mode == 4) {
        for (int i = 0; i < kStage; ++i) buf[0][i] = in[i];
        arrive(&full[0]);
      } else {
        arrive_tx(&full[0], kStage * 4);
        bulk(buf[0], in, kStage * 4, &full[0]);
      }
    }
    wait(&full[0], 0);
    if (mode == 3) __syncthreads();
    for (int i = tid; i < kStage; i += blockDim.x) acc += buf[0][i];
  } else if (warp == kCons) {
    for (int s = 0; s < stages; ++s) {
      const int slot = s % kRing;
      if (s >= kRing) wait(&empty[slot], ((s / kRing) - 1) & 1);
      if (lane == 0) {
        arrive_tx(&full[slot], kStage * 4);
        bulk(buf[slot], in + size_t(s) * kStage, kStage * 4, &full[slot]);
      }
      __syncwarp();
    }
  } else {
    for (int s = 0; s < stages; ++s) {
      const int slot = s % kRing;
      wait(&full[slot], (s / kRing) & 1);
      if (mode == 2) { __syncwarp(); if (lane == 0) arrive(&empty[slot]); }
      for (int i = tid; i < kStage; i += kCons * 32) acc += buf[slot][i];
      __syncwarp();
      if (mode == 1 && lane == 0) arrive(&empty[slot]);
      if (mode == 5) arrive(&empty[slot]);
    }
  }
  atomicAdd(out, acc);
}

int main(int argc, char** argv) {
  const int mode = argc > 1 ? atoi(argv[1]) : 1;
  const int stages = 16;
  float *in, *out;
  cudaMalloc(&in, sizeof(float) * kStage * stages);
  cudaMalloc(&out, sizeof(float));
  float* h = (float*)malloc(sizeof(float) * kStage * stages);
  double want = 0;
  for (int i = 0; i < kStage * stages; ++i) { h[i] = float(i % 7); if (mode == 0 || mode == 3 || mode == 4 ? i < kStage : true) want += h[i]; }
  cudaMemcpy(in, h, sizeof(float) * kStage * stages, cudaMemcpyHostToDevice);
  cudaMemset(out, 0, sizeof(float));
  probe<<<1, (kCons + 1) * 32>>>(in, out, stages, mode);
  float got = 0;
  cudaError_t e = cudaMemcpy(&got, out, sizeof(float), cudaMemcpyDeviceToHost);
  printf("mode %d: %s got %.0f want %.0f\n", mode, cudaGetErrorString(e), got, want);
  return e != cudaSuccess;
}
