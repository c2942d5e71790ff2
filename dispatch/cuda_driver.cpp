#include "cuda_driver.h"

#include <dlfcn.h>

#include <map>
#include <mutex>
#include <stdexcept>
#include <unordered_map>
#include <vector>

#include "cuda_kernels.h"

namespace spqt::cuda {

namespace {

struct Driver {
  CUresult (*get_error_string)(CUresult, const char**);
  CUresult (*device_get_attribute)(int*, CUdevice_attribute, CUdevice);
  CUresult (*module_load_data)(CUmodule*, const void*);
  CUresult (*module_get_function)(CUfunction*, CUmodule, const char*);
  CUresult (*mem_alloc_async)(CUdeviceptr*, size_t, CUstream);
  CUresult (*mem_free_async)(CUdeviceptr, CUstream);
  CUresult (*memset_d8_async)(CUdeviceptr, unsigned char, size_t, CUstream);
  CUresult (*mem_free)(CUdeviceptr);
  CUresult (*mem_free_host)(void*);
};

template <typename F>
void bind(void* lib, F& f, const char* symbol) {
  f = reinterpret_cast<F>(dlsym(lib, symbol));
  if (!f) {
    throw std::runtime_error(std::string("[spqt] the CUDA driver has no ") + symbol + ".");
  }
}

const Driver& driver() {
  static const Driver d = [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      throw std::runtime_error("[spqt] cannot load the CUDA driver (libcuda.so.1).");
    }
    Driver d{};
    bind(lib, d.get_error_string, "cuGetErrorString");
    bind(lib, d.device_get_attribute, "cuDeviceGetAttribute");
    bind(lib, d.module_load_data, "cuModuleLoadData");
    bind(lib, d.module_get_function, "cuModuleGetFunction");
    bind(lib, d.mem_alloc_async, "cuMemAllocAsync");
    bind(lib, d.mem_free_async, "cuMemFreeAsync");
    bind(lib, d.memset_d8_async, "cuMemsetD8Async");
    bind(lib, d.mem_free, "cuMemFree_v2");
    bind(lib, d.mem_free_host, "cuMemFreeHost");
    return d;
  }();
  return d;
}

void check(CUresult r, const char* what) {
  if (r != CUDA_SUCCESS) {
    const char* msg = nullptr;
    driver().get_error_string(r, &msg);
    throw std::runtime_error(
        std::string("[spqt] ") + what + " failed: " + (msg ? msg : "unknown CUDA error") + ".");
  }
}

// Free device memory by size, per device. Plain and zero-holding blocks are kept apart.
struct BlockCache {
  std::mutex mutex;
  std::unordered_map<size_t, std::vector<CUdeviceptr>> free[2];
};

BlockCache& blocks(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, BlockCache*> caches;  // leaked: buffers may outlive exit
  std::lock_guard lock(mutex);
  auto& c = caches[device];
  if (!c) {
    c = new BlockCache;
  }
  return *c;
}

} // namespace

CUfunction kernel(const std::string& name, mx::cu::CommandEncoder& encoder) {
  static std::mutex mutex;
  static std::unordered_map<int, std::unordered_map<std::string, CUfunction>> loaded;
  std::lock_guard lock(mutex);
  auto& on_device = loaded[encoder.device().cuda_device()];
  if (auto it = on_device.find(name); it != on_device.end()) {
    return it->second;
  }
  const EmbeddedKernel* k = find_embedded_kernel(name);
  if (!k) {
    throw std::runtime_error("[spqt] no CUDA kernel named " + name + " in this build.");
  }
  CUmodule module;
  check(driver().module_load_data(&module, k->data), "loading the CUDA kernels");
  CUfunction f;
  check(driver().module_get_function(&f, module, name.c_str()), "finding a CUDA kernel");
  on_device.emplace(name, f);
  return f;
}

namespace {

// An attribute of the encoder's device, asked of the driver once.
int device_attribute(mx::cu::CommandEncoder& encoder, CUdevice_attribute attribute) {
  static std::mutex mutex;
  static std::map<std::pair<int, int>, int> values;
  const int dev = encoder.device().cuda_device();
  std::lock_guard lock(mutex);
  const std::pair<int, int> key{dev, int(attribute)};
  if (auto it = values.find(key); it != values.end()) {
    return it->second;
  }
  int v = 0;
  check(driver().device_get_attribute(&v, attribute, dev), "cuDeviceGetAttribute");
  values.emplace(key, v);
  return v;
}

} // namespace

int multiprocessor_count(mx::cu::CommandEncoder& encoder) {
  return device_attribute(encoder, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT);
}

int compute_capability(mx::cu::CommandEncoder& encoder) {
  return 10 * device_attribute(encoder, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR) +
      device_attribute(encoder, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR);
}

void allocate(mx::array& a, size_t bytes, mx::cu::CommandEncoder& encoder, bool zeroed) {
  const size_t size = std::max<size_t>(256, (bytes + 255) & ~size_t(255));
  const int device = encoder.device().cuda_device();
  BlockCache& cache = blocks(device);
  CUstream stream = encoder.stream();
  CUdeviceptr ptr = 0;
  {
    std::lock_guard lock(cache.mutex);
    auto& list = cache.free[zeroed][size];
    if (!list.empty()) {
      ptr = list.back();
      list.pop_back();
    }
  }
  if (!ptr) {
    // Stream-ordered: the memory is ready for the graph MLX launches on this stream later.
    check(driver().mem_alloc_async(&ptr, size, stream), "allocating device memory");
    if (zeroed) {
      check(driver().memset_d8_async(ptr, 0, size, stream), "clearing device memory");
    }
  }
  auto* buffer = new mx::cu::CudaBuffer{reinterpret_cast<void*>(ptr), size, device};
  a.set_data(mx::allocator::Data(
      mx::allocator::Buffer(buffer), [zeroed, size, ptr, &cache](mx::allocator::Buffer b) {
        auto* buf = static_cast<mx::cu::CudaBuffer*>(b.ptr());
        if (buf->device >= 0) {
          std::lock_guard lock(cache.mutex);
          cache.free[zeroed][size].push_back(ptr);
        } else {
          // Read on the host: MLX moved the data to unified memory and freed our block.
          if (driver().mem_free(reinterpret_cast<CUdeviceptr>(buf->data)) != CUDA_SUCCESS) {
            driver().mem_free_host(buf->data);
          }
        }
        delete buf;
      }));
}

} // namespace spqt::cuda
