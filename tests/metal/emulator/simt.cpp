#include "simt.h"

#include <link.h>
#include <ucontext.h>

#include <algorithm>
#include <exception>
#include <thread>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

namespace simt {

namespace {

constexpr size_t kStackBytes = 128 * 1024;

enum class State { Ready, Running, AtSimd, AtBarrier, Done, Failed };

struct Fiber {
  ucontext_t ctx;
  State state = State::Ready;
  ThreadIds ids;
};

struct Threadgroup {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::vector<SimdSlots> slots;
  std::vector<std::unique_ptr<char[]>> stacks;
  Fiber* current = nullptr;
  const std::function<void(const ThreadIds&)>* body = nullptr;
  std::string error;
};

Threadgroup* active_group = nullptr;

void fiber_main() {
  Threadgroup& g = *active_group;
  (*g.body)(g.current->ids);
  g.current->state = State::Done; // uc_link returns to the scheduler
}

void yield(State s) {
  Threadgroup& g = *active_group;
  Fiber* f = g.current;
  f->state = s;
  swapcontext(&f->ctx, &g.scheduler);
}

// Releases simdgroup sg from its collective once every live lane waits there.
void release_simdgroup(Threadgroup& g, uint sg, uint threads, std::vector<uint>& ready) {
  const uint lo = sg * kSimdSize, hi = std::min(threads, lo + kSimdSize);
  bool any = false;
  for (uint t = lo; t < hi; ++t) {
    const State s = g.fibers[t].state;
    if (s != State::Done && s != State::AtSimd) {
      return;
    }
    any = any || s == State::AtSimd;
  }
  if (!any) {
    return;
  }
  for (uint t = lo; t < hi; ++t) {
    const bool in = g.fibers[t].state == State::AtSimd;
    g.slots[sg].present[t - lo] = in;
    if (in) {
      g.fibers[t].state = State::Ready;
      ready.push_back(t);
    }
  }
}

// Releases the threadgroup barrier once every thread waits there.
void release_barrier(Threadgroup& g, std::vector<uint>& ready) {
  size_t waiting = 0, done = 0;
  for (auto& f : g.fibers) {
    waiting += f.state == State::AtBarrier;
    done += f.state == State::Done;
  }
  if (waiting == 0 || waiting + done < g.fibers.size()) {
    return;
  }
  if (done > 0) {
    throw std::runtime_error("threadgroup_barrier: " + std::to_string(done) +
                             " threads of the threadgroup returned without reaching it");
  }
  for (uint t = 0; t < g.fibers.size(); ++t) {
    g.fibers[t].state = State::Ready;
    ready.push_back(t);
  }
}

// Threadgroup memory: metal_compat.h turns kernel-scope `threadgroup` arrays into thread_local
// statics of this module, and every threadgroup runs on a fresh OS thread. Before it starts, the
// module's whole TLS block of that thread (all threadgroup arrays of all kernels) is set to 0xff:
// NaN as float, -1 as int, so whatever a thread reads before anybody wrote it is poison.
thread_local unsigned char tls_anchor;

void poison_threadgroup_memory() {
  tls_anchor = 1; // makes sure the block exists for this thread
  struct Search {
    const void* anchor;
    bool found;
  } search{&tls_anchor, false};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) -> int {
        auto* s = static_cast<Search*>(data);
        if (!info->dlpi_tls_data) {
          return 0;
        }
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          if (info->dlpi_phdr[i].p_type != PT_TLS) {
            continue;
          }
          auto* lo = static_cast<unsigned char*>(info->dlpi_tls_data);
          const size_t size = info->dlpi_phdr[i].p_memsz;
          if (s->anchor >= lo && s->anchor < lo + size) {
            std::memset(lo, 0xff, size);
            s->found = true;
            return 1;
          }
        }
        return 0;
      },
      &search);
  if (!search.found) {
    throw std::runtime_error("could not locate threadgroup memory to poison it");
  }
}

std::map<std::string, std::pair<void*, std::type_index>>& registry() {
  static std::map<std::string, std::pair<void*, std::type_index>> r;
  return r;
}

void run_threadgroup(Threadgroup& g, uint3 tg, uint3 grid, uint threads, uint simdgroups, uint64_t seed,
                     std::mt19937_64& rng) {
  for (uint t = 0; t < threads; ++t) {
    Fiber& f = g.fibers[t];
    f.state = State::Ready;
    f.ids = ThreadIds{tg, grid, t, threads, t / kSimdSize, simdgroups, t % kSimdSize, tg.x * threads + t};
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = g.stacks[t].get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &g.scheduler;
    makecontext(&f.ctx, fiber_main, 0);
  }
  active_group = &g;
  // Runs one ready fiber at a time up to its next sync point: the highest thread index first
  // (seed 0) or a random one, so a simdgroup released from a collective may race ahead of threads
  // that have not yet left the previous phase.
  std::vector<uint> ready(threads);
  std::iota(ready.begin(), ready.end(), 0u);
  while (!ready.empty()) {
    const size_t pos = seed == 0 ? size_t(std::max_element(ready.begin(), ready.end()) - ready.begin())
                                 : size_t(rng() % ready.size());
    const uint t = ready[pos];
    ready[pos] = ready.back();
    ready.pop_back();
    Fiber& f = g.fibers[t];
    g.current = &f;
    f.state = State::Running;
    swapcontext(&g.scheduler, &f.ctx);
    if (f.state == State::Running) {
      f.state = State::Done; // returned through uc_link
    }
    if (!g.error.empty()) {
      throw std::runtime_error(g.error);
    }
    release_simdgroup(g, t / kSimdSize, threads, ready);
    release_barrier(g, ready);
  }
  if (!std::all_of(g.fibers.begin(), g.fibers.end(), [](const Fiber& f) { return f.state == State::Done; })) {
    throw std::runtime_error(
        "deadlock: threads wait at different synchronization points (a barrier or simd collective "
        "inside divergent control flow)");
  }
}

} // namespace

void launch(uint3 grid, uint threads, uint64_t seed, const std::function<void(const ThreadIds&)>& body) {
  if (threads == 0 || threads > 1024) {
    throw std::runtime_error("threadgroup size must be in [1, 1024]");
  }
  const uint simdgroups = (threads + kSimdSize - 1) / kSimdSize;
  std::mt19937_64 rng(seed);

  std::vector<uint3> order;
  for (uint z = 0; z < grid.z; ++z) {
    for (uint y = 0; y < grid.y; ++y) {
      for (uint x = 0; x < grid.x; ++x) {
        order.push_back({x, y, z});
      }
    }
  }
  if (seed == 0) {
    std::reverse(order.begin(), order.end());
  } else {
    std::shuffle(order.begin(), order.end(), rng);
  }

  Threadgroup g;
  g.body = &body;
  g.fibers.resize(threads);
  g.slots.resize(simdgroups);
  for (uint t = 0; t < threads; ++t) {
    g.stacks.emplace_back(new char[kStackBytes]);
  }
  for (const uint3& tg : order) {
    std::exception_ptr error;
    std::thread worker([&] {
      try {
        poison_threadgroup_memory();
        run_threadgroup(g, tg, grid, threads, simdgroups, seed, rng);
      } catch (...) {
        error = std::current_exception();
      }
      active_group = nullptr;
    });
    worker.join();
    if (error) {
      std::rethrow_exception(error);
    }
  }
}

const ThreadIds& self() {
  return active_group->current->ids;
}

void threadgroup_barrier() {
  yield(State::AtBarrier);
}

void fail(const std::string& what) {
  active_group->error = what;
  yield(State::Failed);
  __builtin_unreachable(); // a failed fiber is never resumed
}

SimdSlots& simd_slots() {
  return active_group->slots[self().sg];
}

void simd_sync() {
  yield(State::AtSimd);
}

bool register_kernel(const char* name, void* fn, std::type_index type) {
  // Runs during static initialization: a duplicate is reported when the name is looked up.
  auto [it, inserted] = registry().emplace(name, std::make_pair(fn, type));
  if (!inserted) {
    it->second.first = nullptr;
  }
  return true;
}

void* find_kernel(const std::string& name, std::type_index type) {
  auto it = registry().find(name);
  if (it == registry().end()) {
    throw std::runtime_error("no kernel instantiated with the host name " + name);
  }
  if (it->second.first == nullptr) {
    throw std::runtime_error("two kernels share the host name " + name);
  }
  if (it->second.second != type) {
    throw std::runtime_error("kernel " + name + " has a different signature than the host expects");
  }
  return it->second.first;
}

} // namespace simt
