// A CPU emulation of the CUDA features that bertkern's kernels (csrc/*.cu) use, so that machines
// without a GPU (CI) run those kernels themselves: their indexing, tiling, reductions, masking,
// dropout rows, tails and launch configurations. It checks the code, not the hardware: timing,
// memory ordering and the numerics of the real instructions (tensor-core accumulation order,
// approximate exp / rsqrt) are not emulated.
//
// Include this first, then a csrc/*.cu file: with BERTKERN_EMULATE defined, common.cuh leaves the
// launch layer (launch, DeviceScope, is_device_tensor, BERTKERN_OPS...) to this file, and the file's
// ops register as torch.ops.bertkern_cuda_emu.* with CPU kernels.
//
// - A block runs as one fiber per CUDA thread (1-, 2- or 3-D blocks), all on the launching OS thread:
//   each runs until it waits at a barrier (__syncthreads() is one of the block, __syncwarp and the
//   warp collectives one of the warp), then the next thread that can go on runs. Switching a fiber
//   is a function call, where an OS thread per CUDA thread spent most of its time in the scheduler;
//   a barrier that not every thread reaches is reported, not a hang. Blocks run one after another:
//   function-static variables stand for __shared__ ones, and one buffer, filled with NaN bytes
//   before each block, for dynamic shared memory (reads of shared memory never written show up).
// - The order in which threads take turns is $BERTKERN_EMU_SCHEDULE's, read at each launch: "forward"
//   (the default: thread 0 first, then round robin upwards), "reverse" (round robin downwards from the
//   last thread), "lowest" / "highest" (always the lowest / highest-numbered thread that can go on: its
//   warp runs ahead through its warp barriers until it waits at a block barrier, while the others have
//   not started), or "random:SEED" (a seeded random thread first, and at each switch). A shared-memory
//   race (two threads touching the same bytes between the same two barriers of theirs, one writing)
//   gives an order-dependent result, so it fails under some of them; tests run the kernels under each.
//   $BERTKERN_EMU_BLOCKS=reverse runs a grid's blocks last to first (the default: in grid order).
// - Warp shuffles and mma.sync exchange values through per-warp slots between two barriers of the
//   warp (every lane of the warp must take part, as the kernels' full masks promise).
// - mma.sync m16n8k16 decodes its operands with the PTX ISA's fragment layouts (lane = 4g + t:
//   A a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..);
//   B b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g); C c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, ..)),
//   multiplies in fp32 and adds to the lane's accumulators.
// - ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16 (emu::ldmatrix): lane i gives the row
//   address of row i % 8 of matrix i / 8 (16-byte aligned); each lane gets, per matrix, the two b16
//   of row lane / 4, columns 2 (lane % 4) and +1 (.trans: of the transposed matrix).
// - cp.async (emu::cp_async, 4 / 8 / 16 bytes, src-size zero-fill) is DEFERRED: each thread queues
//   its copies; commit_group closes a group; wait_group N performs every committed group but the
//   newest N (wait_all: all). A read of the destination before the wait sees the NaN-filled shared
//   memory (or the previous tile), so a missing wait or barrier fails a test instead of passing by
//   luck. Copies never waited for are dropped at the end of the block.
// - Errors a GPU would fault on (misaligned ldmatrix / cp.async addresses) are recorded by the
//   thread and raised by the launch after the block.
// - The device has 4 SMs (so grid-stride loops and partial sums run several rounds) and sm_90.
#pragma once

#define BERTKERN_EMULATE 1

#include <ATen/core/Tensor.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace emu {

constexpr int kWarpSize = 32;
constexpr size_t kSmemBytes = 232448;  // an H100 block's maximum

struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes, src_bytes;
};

// One CUDA thread of the running block.
struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  const unsigned* waiting = nullptr;  // a barrier's phase: this thread waits until it moves past `phase`
  unsigned phase = 0;
  bool done = false;
  std::vector<AsyncCopy> cp_open;                // cp.async issued since the last commit
  std::deque<std::vector<AsyncCopy>> cp_groups;  // committed, oldest first
};

inline std::vector<Fiber> fibers;  // the running block's threads
inline int current = 0;            // the running one's linear index
inline ucontext_t launcher;        // run_grid's context: back there when no thread can go on

inline uint3 thread_idx;
inline uint3 block_idx;
inline dim3 block_dim, grid_dim;
alignas(16) inline unsigned char smem[kSmemBytes];

inline Fiber& self() { return fibers[current]; }

// $BERTKERN_EMU_SCHEDULE (see the top of this file): which thread runs first, and which next.
enum class Schedule { kForward, kReverse, kLowest, kHighest, kRandom };
inline Schedule schedule = Schedule::kForward;
inline uint64_t schedule_rng = 0;  // kRandom's state (splitmix64)

inline uint64_t next_random() {
  uint64_t z = (schedule_rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

inline void read_schedule() {
  const char* s = std::getenv("BERTKERN_EMU_SCHEDULE");
  const std::string v = s ? s : "";
  const std::pair<const char*, Schedule> named[] = {
      {"", Schedule::kForward}, {"forward", Schedule::kForward}, {"reverse", Schedule::kReverse},
      {"lowest", Schedule::kLowest}, {"highest", Schedule::kHighest}};
  for (const auto& [name, value] : named) {
    if (v == name) {
      schedule = value;
      return;
    }
  }
  if (v.rfind("random:", 0) == 0 && v.size() > 7 && v.size() < 27 &&
      v.find_first_not_of("0123456789", 7) == std::string::npos) {
    schedule = Schedule::kRandom;
    schedule_rng = std::stoull(v.substr(7));
    return;
  }
  throw std::runtime_error("emulated launch: BERTKERN_EMU_SCHEDULE must be forward, reverse, lowest, highest or "
                           "random:SEED, got '" + v + "'");
}

// $BERTKERN_EMU_BLOCKS: "forward" (the default) or "reverse" (see run_grid).
inline bool read_block_order() {
  const char* s = std::getenv("BERTKERN_EMU_BLOCKS");
  const std::string v = s ? s : "";
  if (v.empty() || v == "forward") return false;
  if (v == "reverse") return true;
  throw std::runtime_error("emulated launch: BERTKERN_EMU_BLOCKS must be forward or reverse, got '" + v + "'");
}

// The thread that runs first.
inline int first_thread(int n) {
  switch (schedule) {
    case Schedule::kReverse:
    case Schedule::kHighest: return n - 1;
    case Schedule::kRandom: return static_cast<int>(next_random() % n);
    default: return 0;
  }
}

// The k-th thread (k = 1 .. n) a switch away from `from` tries; `start` is kRandom's random one.
inline int candidate(int from, int start, int k, int n) {
  switch (schedule) {
    case Schedule::kReverse: return (from - k % n + n) % n;
    case Schedule::kLowest: return k - 1;
    case Schedule::kHighest: return n - k;
    case Schedule::kRandom: return (start + k) % n;
    default: return (from + k) % n;
  }
}

// Runs the next thread that can go on, in the schedule's order, or returns to run_grid when none can.
inline void switch_from(int from) {
  const int n = static_cast<int>(fibers.size());
  const int start = schedule == Schedule::kRandom ? static_cast<int>(next_random() % n) : 0;
  for (int k = 1; k <= n; ++k) {
    const int to = candidate(from, start, k, n);
    if (to == from) continue;
    const Fiber& f = fibers[to];
    if (!f.done && (f.waiting == nullptr || *f.waiting != f.phase)) {
      current = to;
      thread_idx = f.tid;
      swapcontext(&fibers[from].ctx, &fibers[to].ctx);
      return;
    }
  }
  swapcontext(&fibers[from].ctx, &launcher);
}

// A barrier of `expected` threads: the last to arrive starts the next phase and goes on; the others
// wait until it does.
struct Barrier {
  explicit Barrier(int n) : expected(n) {}
  int expected, arrived = 0;
  unsigned phase = 0;

  void arrive_and_wait() {
    if (++arrived == expected) {
      arrived = 0;
      ++phase;
      return;
    }
    const int me = current;
    fibers[me].waiting = &phase;
    fibers[me].phase = phase;
    switch_from(me);
    fibers[me].waiting = nullptr;
  }
};

struct Warp {
  explicit Warp(int lanes) : bar(lanes) {}
  Barrier bar;
  double v[kWarpSize];  // shuffle slots (wide enough for every shuffled type)
  uint32_t a[kWarpSize][4];
  uint32_t b[kWarpSize][2];
  const unsigned char* rows[kWarpSize];  // ldmatrix row addresses
};

struct Block {
  explicit Block(int threads) : bar(threads) {
    for (int w = 0; w * kWarpSize < threads; ++w) warps.emplace_back(new Warp(std::min(kWarpSize, threads - w * kWarpSize)));
  }
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline Block* block = nullptr;

inline std::atomic<const char*> fault{nullptr};  // set by a thread, raised by run_grid

inline void set_fault(const char* what) {
  const char* none = nullptr;
  fault.compare_exchange_strong(none, what);
}

inline Warp& warp() { return *block->warps[current / kWarpSize]; }
inline int lane() { return current % kWarpSize; }
inline unsigned char* dynamic_smem() { return smem; }

inline int device_attribute(cudaDeviceAttr attr) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      return 4;
    case cudaDevAttrComputeCapabilityMajor:
      return 9;
    default:
      return 0;
  }
}

// The fibers' stacks: kStackBytes each above a guard page (an overflow faults), mapped once for the
// most threads a block can have; a stack's pages are only touched as deep as its thread's calls go.
constexpr int kMaxThreads = 1024;
constexpr size_t kPage = 4096, kStackBytes = 256 * 1024;

inline unsigned char* stack(int t) {
  static unsigned char* const base = [] {
    void* p = mmap(nullptr, kMaxThreads * (kPage + kStackBytes), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("emulated launch: no memory for the threads' stacks");
    unsigned char* b = static_cast<unsigned char*>(p);
    for (int i = 0; i < kMaxThreads; ++i) mprotect(b + i * (kPage + kStackBytes), kPage, PROT_NONE);
    return b;
  }();
  return base + t * (kPage + kStackBytes) + kPage;
}

inline void (*body_fn)(void*) = nullptr;
inline void* body_arg = nullptr;

inline void fiber_main() {
  body_fn(body_arg);
  fibers[current].done = true;
  switch_from(current);  // never comes back
}

// Runs body() as every thread of every block of the grid.
template <typename Body>
void run_grid(dim3 grid, dim3 blk, size_t dynamic_bytes, Body&& body) {
  if (dynamic_bytes > kSmemBytes) throw std::runtime_error("emulated launch: too much dynamic shared memory");
  const int threads = static_cast<int>(blk.x * blk.y * blk.z);
  if (threads < 1 || threads > kMaxThreads) throw std::runtime_error("emulated launch: 1 to 1024 threads per block");
  grid_dim = grid;
  block_dim = blk;
  body_fn = [](void* b) { (*static_cast<std::remove_reference_t<Body>*>(b))(); };
  body_arg = &body;
  fibers.resize(threads);
  read_schedule();
  // Blocks in grid order (x fastest, as a GPU hands them out), or last to first under
  // $BERTKERN_EMU_BLOCKS=reverse: a block that writes into another's outputs passes unnoticed when the
  // right one happens to write last.
  const bool reverse_blocks = read_block_order();
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  for (uint64_t i = 0; i < blocks; ++i) {
    const uint64_t j = reverse_blocks ? blocks - 1 - i : i;
    const unsigned x = j % grid.x, y = j / grid.x % grid.y, z = j / (uint64_t{grid.x} * grid.y);
    std::memset(smem, 0xff, kSmemBytes);  // NaN in fp16, bf16, fp32 and fp64
    Block b(threads);
    block = &b;
    block_idx = make_uint3(x, y, z);
    for (int t = 0; t < threads; ++t) {
      Fiber& f = fibers[t];
      f.tid = make_uint3(t % blk.x, t / blk.x % blk.y, t / (blk.x * blk.y));
      f.waiting = nullptr;
      f.done = false;
      f.cp_open.clear();  // copies never waited for are dropped with their block
      f.cp_groups.clear();
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = stack(t);
      f.ctx.uc_stack.ss_size = kStackBytes;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, fiber_main, 0);
    }
    current = first_thread(threads);
    thread_idx = fibers[current].tid;
    swapcontext(&launcher, &fibers[current].ctx);
    for (const Fiber& f : fibers) {
      // (A thread left at a barrier keeps what its stack holds: leaked, as a hung GPU would.)
      if (!f.done) throw std::runtime_error("emulated kernel: a barrier that not every thread of the block reached");
    }
    if (const char* f = fault.exchange(nullptr)) throw std::runtime_error(std::string("emulated kernel: ") + f);
  }
}

template <typename T>
float to_float(uint16_t bits) {
  if constexpr (std::is_same_v<T, __half>) {
    __half_raw r;
    r.x = bits;
    return __half2float(__half(r));
  } else {
    const uint32_t w = static_cast<uint32_t>(bits) << 16;  // bf16 is the top half of an fp32
    float f;
    std::memcpy(&f, &w, sizeof f);
    return f;
  }
}

}  // namespace emu

// ------------------------------------------------------------------ the launch layer of common.cuh
#define BERTKERN_OPS bertkern_cuda_emu
#define BERTKERN_DEVICE CPU
#define BERTKERN_DYNAMIC_SMEM(name) unsigned char* name = ::emu::dynamic_smem()

namespace bertkern {

inline bool is_device_tensor(const at::Tensor& t) { return t.is_cpu(); }

class DeviceScope {
 public:
  explicit DeviceScope(const at::Tensor&) {}
  cudaStream_t stream() const { return nullptr; }
};

// Every launch since the last clear: the kernel's address, grid, block and dynamic shared memory, so
// that a test can say which instantiation the host code picked at a shape and how it launched it
// (tests/test_sass_report.py checks sass_report's CUDA launch table with it).
struct LaunchRecord {
  const void* kernel;
  dim3 grid, block;
  size_t smem;
};
inline std::vector<LaunchRecord> launches;

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args&&... args) {
  launches.push_back({reinterpret_cast<const void*>(kernel), grid, block, smem});
  // Arguments are copied at launch, as the real launch does.
  std::tuple<std::decay_t<KArgs>...> copied(static_cast<KArgs>(std::forward<Args>(args))...);
  emu::run_grid(grid, block, smem, [&] { std::apply(kernel, copied); });
}

}  // namespace bertkern

// The launch record for Python (ctypes; the kernels are local symbols, so the caller names them from
// the library's symbol table): launch i's library path, the kernel's offset in it, grid x y z, block
// x y z and dynamic shared memory bytes in out[0..7]. Returns false past the last launch.
extern "C" bool bertkern_emu_launch(size_t i, char* path, size_t path_len, uint64_t* out) {
  if (i >= bertkern::launches.size()) return false;
  const bertkern::LaunchRecord& r = bertkern::launches[i];
  Dl_info info{};
  if (dladdr(r.kernel, &info) == 0 || info.dli_fname == nullptr) return false;
  std::snprintf(path, path_len, "%s", info.dli_fname);
  const uint64_t v[8] = {static_cast<uint64_t>(static_cast<const char*>(r.kernel) - static_cast<const char*>(info.dli_fbase)),
                         r.grid.x, r.grid.y, r.grid.z, r.block.x, r.block.y, r.block.z, r.smem};
  std::memcpy(out, v, sizeof v);
  return true;
}
extern "C" void bertkern_emu_clear_launches() { bertkern::launches.clear(); }

// ------------------------------------------------------------------ CUDA built-ins for host code
// (cuda_runtime.h maps __global__, __device__, __align__ to host attributes.)
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)
#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { emu::block->bar.arrive_and_wait(); }

template <typename V>
V __shfl_xor_sync(unsigned /*mask: every lane takes part here*/, V v, int lane_mask, int /*width*/ = 32) {
  static_assert(sizeof(V) <= sizeof(double), "shuffle slot too small");
  emu::Warp& w = emu::warp();
  const int lane = emu::lane();
  std::memcpy(&w.v[lane], &v, sizeof v);
  w.bar.arrive_and_wait();
  V r;
  std::memcpy(&r, &w.v[lane ^ lane_mask], sizeof r);
  w.bar.arrive_and_wait();
  return r;
}

inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }

// Runtime calls of host code. C10_CUDA_CHECK without libc10_cuda (not linked here); the occupancy
// query answers one block per SM (so grid-stride loops run the most rounds). A template more
// specialized than cuda_runtime.h's, so no call reaches the real runtime.
#include <c10/cuda/CUDAException.h>
#undef C10_CUDA_CHECK
#define C10_CUDA_CHECK(EXPR) TORCH_CHECK((EXPR) == cudaSuccess, "emulated CUDA call failed: " #EXPR)
template <typename... KArgs>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void (*)(KArgs...), int, size_t) {
  *blocks = 1;
  return cudaSuccess;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: c (16 x 8) += a (16 x 16) b (16 x 8).
template <typename T>
void emulate_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::Warp& w = emu::warp();
  const int lane = emu::lane();
  for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i];
  w.b[lane][0] = b0;
  w.b[lane][1] = b1;
  w.bar.arrive_and_wait();
  // Only what this lane's accumulators need: rows g and g + 8 of A (held by lanes 4g .. 4g + 3) and
  // columns 2t, 2t + 1 of B (lanes 8t .. 8t + 3, 8t + 4 .. 8t + 7).
  auto lo = [](uint32_t r) { return emu::to_float<T>(static_cast<uint16_t>(r & 0xffffu)); };
  auto hi = [](uint32_t r) { return emu::to_float<T>(static_cast<uint16_t>(r >> 16)); };
  const int g = lane / 4, t = lane % 4;
  float A[2][16], B[2][16];  // A[i][k] = A(g + 8i, k), B[j][k] = B(k, 2t + j)
  for (int q = 0; q < 4; ++q) {
    const uint32_t* ra = w.a[4 * g + q];
    for (int i = 0; i < 2; ++i) {
      A[i][2 * q] = lo(ra[i]), A[i][2 * q + 1] = hi(ra[i]);
      A[i][2 * q + 8] = lo(ra[i + 2]), A[i][2 * q + 9] = hi(ra[i + 2]);
    }
    for (int j = 0; j < 2; ++j) {
      const uint32_t* rb = w.b[4 * (2 * t + j) + q];
      B[j][2 * q] = lo(rb[0]), B[j][2 * q + 1] = hi(rb[0]);
      B[j][2 * q + 8] = lo(rb[1]), B[j][2 * q + 9] = hi(rb[1]);
    }
  }
  w.bar.arrive_and_wait();  // every lane has read the slots before any lane reuses them
  for (int e = 0; e < 4; ++e) {
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A[e / 2][k] * B[e & 1][k];
    c[e] += acc;
  }
}

// ------------------------------------------------------------------ ldmatrix and cp.async
namespace emu {

// ldmatrix.sync.aligned.m8n8.x<kMats>[.trans].shared.b16: r[m] holds matrix m's two b16 at row
// lane / 4, columns 2 (lane % 4), 2 (lane % 4) + 1 (the lower column in the low half); the rows of
// matrix m come from lanes 8m .. 8m + 7 (row_addr of the other lanes is ignored, as in PTX).
template <int kMats, bool kTrans>
void ldmatrix(uint32_t* r, const void* row_addr) {
  static_assert(kMats == 1 || kMats == 2 || kMats == 4, "ldmatrix: .x1, .x2 or .x4");
  Warp& w = warp();
  const int l = lane();
  w.rows[l] = static_cast<const unsigned char*>(row_addr);
  if (l < 8 * kMats && reinterpret_cast<uintptr_t>(row_addr) % 16 != 0) {
    set_fault("ldmatrix row address not 16-byte aligned");
  }
  w.bar.arrive_and_wait();
  for (int m = 0; m < kMats; ++m) {
    uint16_t e[2];
    for (int x = 0; x < 2; ++x) {
      const int row = kTrans ? 2 * (l % 4) + x : l / 4, col = kTrans ? l / 4 : 2 * (l % 4) + x;
      std::memcpy(&e[x], w.rows[8 * m + row] + 2 * col, 2);
    }
    r[m] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
  w.bar.arrive_and_wait();  // every lane has read the addresses before any lane reuses the slots
}

// cp.async.{ca,cg}.shared.global [dst], [src], bytes, src_bytes: queued, performed at a wait.
inline void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  if (bytes != 4 && bytes != 8 && bytes != 16) set_fault("cp.async size must be 4, 8 or 16");
  if (src_bytes < 0 || src_bytes > bytes) set_fault("cp.async src-size outside [0, size]");
  const auto misaligned = [bytes](const void* q) { return reinterpret_cast<uintptr_t>(q) % bytes != 0; };
  if (misaligned(dst) || (src_bytes > 0 && misaligned(src))) {
    set_fault("cp.async address not aligned to its size");
  }
  self().cp_open.push_back({dst, src, bytes, src_bytes});
}

inline void cp_async_commit() {
  Fiber& f = self();
  f.cp_groups.push_back(std::move(f.cp_open));
  f.cp_open.clear();
}

// cp.async.wait_group n: every committed group but the newest n has landed.
inline void cp_async_wait(int n) {
  std::deque<std::vector<AsyncCopy>>& cp_groups = self().cp_groups;
  while (static_cast<int>(cp_groups.size()) > n) {
    for (const AsyncCopy& c : cp_groups.front()) {
      unsigned char* d = static_cast<unsigned char*>(c.dst);
      std::memcpy(d, c.src, c.src_bytes);
      std::memset(d + c.src_bytes, 0, c.bytes - c.src_bytes);
    }
    cp_groups.pop_front();
  }
}

inline void cp_async_wait_all() {  // = commit_group; wait_group 0
  cp_async_commit();
  cp_async_wait(0);
}

}  // namespace emu

inline void __syncwarp(unsigned /*mask: every lane takes part here*/ = 0xffffffffu) {
  emu::warp().bar.arrive_and_wait();
}
