// Counts the CUDA driver calls a process makes, and the host time spent in each, through CUPTI's
// callback API. MLX links the CUDA runtime statically, so its calls cannot be interposed; CUPTI
// sees them where they reach the driver. Used by decode_variance.py through ctypes:
//
//   g++ -O2 -shared -fPIC -I$CUDA/include driver_calls.cpp -L$CUDA/lib -lcupti -o driver_calls.so
//
//   driver_calls_start()            subscribe (once) and zero the counters
//   driver_calls_read(ids, counts, failures, ns, n)   copy the nonzero counters out, return how many
//   driver_calls_name(id)           the driver function's name

#include <cupti.h>

#include <atomic>
#include <chrono>
#include <cstdint>

namespace {

constexpr int kMax = CUPTI_DRIVER_TRACE_CBID_SIZE;

std::atomic<int64_t> counts[kMax];
std::atomic<int64_t> failures[kMax];
std::atomic<int64_t> nanos[kMax];
CUpti_SubscriberHandle subscriber = nullptr;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void CUPTIAPI on_call(void*, CUpti_CallbackDomain domain, CUpti_CallbackId id, const void* data) {
  if (domain != CUPTI_CB_DOMAIN_DRIVER_API || id >= kMax) {
    return;
  }
  auto* info = static_cast<const CUpti_CallbackData*>(data);
  // correlationData is one slot per call, kept from its entry to its exit.
  if (info->callbackSite == CUPTI_API_ENTER) {
    *info->correlationData = uint64_t(now_ns());
    return;
  }
  counts[id].fetch_add(1, std::memory_order_relaxed);
  nanos[id].fetch_add(now_ns() - int64_t(*info->correlationData), std::memory_order_relaxed);
  auto* result = static_cast<const CUresult*>(info->functionReturnValue);
  if (result && *result != CUDA_SUCCESS) {
    failures[id].fetch_add(1, std::memory_order_relaxed);
  }
}

} // namespace

extern "C" {

int driver_calls_start() {
  if (!subscriber) {
    if (cuptiSubscribe(&subscriber, on_call, nullptr) != CUPTI_SUCCESS) {
      return 1;
    }
    if (cuptiEnableDomain(1, subscriber, CUPTI_CB_DOMAIN_DRIVER_API) != CUPTI_SUCCESS) {
      return 2;
    }
  }
  for (int i = 0; i < kMax; ++i) {
    counts[i] = 0;
    failures[i] = 0;
    nanos[i] = 0;
  }
  return 0;
}

int driver_calls_read(int* ids, int64_t* count, int64_t* failed, int64_t* ns, int n) {
  int k = 0;
  for (int i = 0; i < kMax && k < n; ++i) {
    if (counts[i] > 0) {
      ids[k] = i;
      count[k] = counts[i];
      failed[k] = failures[i];
      ns[k] = nanos[i];
      ++k;
    }
  }
  return k;
}

const char* driver_calls_name(int id) {
  const char* name = nullptr;
  if (cuptiGetCallbackName(CUPTI_CB_DOMAIN_DRIVER_API, uint32_t(id), &name) != CUPTI_SUCCESS) {
    return "?";
  }
  return name;
}

}
