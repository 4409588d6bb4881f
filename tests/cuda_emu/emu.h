// A CPU emulation of the CUDA features that csrc/attention.cu's kernels use, so that machines without
// a GPU (CI) run those kernels themselves: their indexing, tiling, masking, online softmax, dropout
// rows, tails and layouts. It checks the code, not the hardware: timing, memory ordering and
// numerics of the real tensor cores (accumulation order, approximate exp) are not emulated.
//
// - A block runs as one std::thread per CUDA thread; __syncthreads() is a barrier of the block.
// - Warp shuffles and mma.sync exchange values through per-warp slots between two barriers of the
//   warp; mma.sync m16n8k16 decodes its operands with the PTX ISA's fragment layouts (lane = 4g + t:
//   A a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..);
//   B b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g); C c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, ..)),
//   multiplies in fp32 and adds to the lane's accumulators.
// - Blocks run one after another, sharing one shared-memory buffer that is filled with NaN bytes
//   before each block (reads of shared memory never written show up).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

namespace emu {

constexpr int kWarpSize = 32;

struct Warp {
  std::barrier<> bar{kWarpSize};
  float f[kWarpSize];
  uint32_t a[kWarpSize][4];
  uint32_t b[kWarpSize][2];
};

struct Block {
  explicit Block(int threads) : bar(threads), warps(new Warp[threads / kWarpSize]) {}
  std::barrier<> bar;
  std::unique_ptr<Warp[]> warps;
};

inline thread_local uint3 thread_idx;
inline thread_local uint3 block_idx;
inline thread_local Block* block = nullptr;

inline Warp& warp() { return block->warps[thread_idx.x / kWarpSize]; }
inline int lane() { return static_cast<int>(thread_idx.x % kWarpSize); }

template <typename T>
float to_float(uint16_t bits) {
  if constexpr (std::is_same_v<T, __half>) {
    __half_raw r;
    r.x = bits;
    return __half2float(__half(r));
  } else {
    uint32_t w = static_cast<uint32_t>(bits) << 16;  // bf16 is the top half of an fp32
    float f;
    std::memcpy(&f, &w, sizeof f);
    return f;
  }
}

// Runs kernel(p) over `grid` blocks of `threads` threads each; `smem` is the kernels' shared buffer.
template <typename Kernel, typename P>
void run_grid(Kernel kernel, dim3 grid, int threads, const P& p, unsigned char* smem, size_t smem_bytes) {
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        std::memset(smem, 0xff, smem_bytes);  // NaN in fp16, bf16 and fp32
        Block blk(threads);
        std::vector<std::thread> team;
        team.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          team.emplace_back([&, t] {
            thread_idx = make_uint3(static_cast<unsigned>(t), 0u, 0u);
            block_idx = make_uint3(x, y, z);
            block = &blk;
            kernel(p);
          });
        }
        for (auto& th : team) th.join();
      }
    }
  }
}

}  // namespace emu

// The CUDA built-ins, for host code (cuda_runtime.h already maps __global__, __device__,
// __shared__ and __align__ to host attributes).
#define __launch_bounds__(...)
#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)

inline void __syncthreads() { emu::block->bar.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned /*mask: every lane takes part here*/, float v, int lane_mask) {
  emu::Warp& w = emu::warp();
  const int lane = emu::lane();
  w.f[lane] = v;
  w.bar.arrive_and_wait();
  const float r = w.f[lane ^ lane_mask];
  w.bar.arrive_and_wait();
  return r;
}

inline float __expf(float x) { return std::exp(x); }

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: c (16 x 8) += a (16 x 16) b (16 x 8).
template <typename T>
void emulate_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::Warp& w = emu::warp();
  const int lane = emu::lane();
  for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i];
  w.b[lane][0] = b0;
  w.b[lane][1] = b1;
  w.bar.arrive_and_wait();
  float A[16][16], B[16][8];
  auto lo = [](uint32_t r) { return emu::to_float<T>(static_cast<uint16_t>(r & 0xffffu)); };
  auto hi = [](uint32_t r) { return emu::to_float<T>(static_cast<uint16_t>(r >> 16)); };
  for (int L = 0; L < emu::kWarpSize; ++L) {
    const int g = L / 4, t = L % 4;
    const uint32_t* ra = w.a[L];
    A[g][2 * t] = lo(ra[0]), A[g][2 * t + 1] = hi(ra[0]);
    A[g + 8][2 * t] = lo(ra[1]), A[g + 8][2 * t + 1] = hi(ra[1]);
    A[g][2 * t + 8] = lo(ra[2]), A[g][2 * t + 9] = hi(ra[2]);
    A[g + 8][2 * t + 8] = lo(ra[3]), A[g + 8][2 * t + 9] = hi(ra[3]);
    B[2 * t][g] = lo(w.b[L][0]), B[2 * t + 1][g] = hi(w.b[L][0]);
    B[2 * t + 8][g] = lo(w.b[L][1]), B[2 * t + 9][g] = hi(w.b[L][1]);
  }
  w.bar.arrive_and_wait();  // every lane has read the slots before any lane reuses them
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + (e & 1);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    c[e] += acc;
  }
}
