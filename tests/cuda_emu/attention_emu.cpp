// csrc/attention.cu on the CPU: its ops as torch.ops.bertkern_cuda_emu.attention_fwd / _bwd.
#include "emu.h"  // first: the emulated launch layer

#include "attention.cu"  // csrc/ is on the include path

// Probes of csrc/ptx.cuh's primitives as the kernels call them, so that tests pin the emulation's
// ldmatrix layouts and cp.async timing against the PTX ISA (test_attention_emulated.py computes
// the expected values itself), and of the emulation's thread orders.
namespace probe {

// smem holds a 32 x 16 b16 tile, element (r, c) = 16 r + c; lane l gives row l (matrix l / 8) for
// .x1 / .x2 / .x4, plain and .trans; out[variant][lane][m] = register m.
__global__ void ldmatrix_kernel(int64_t* out) {
  BERTKERN_DYNAMIC_SMEM(smem);
  uint16_t* tile = reinterpret_cast<uint16_t*>(smem);
  const int l = threadIdx.x;
  for (int c = 0; c < 16; ++c) tile[l * 16 + c] = static_cast<uint16_t>(16 * l + c);
  __syncwarp();
  const uint16_t* row = tile + l * 16;
  auto put = [&](int variant, const uint32_t* r, int n) {
    for (int m = 0; m < 4; ++m) out[(variant * 32 + l) * 4 + m] = m < n ? static_cast<int64_t>(r[m]) : -1;
  };
  uint32_t r1[1], r2[2], r4[4];
  // Lanes past the matrices give a misaligned address: PTX ignores them, so must the emulation.
  bertkern::ptx::ldmatrix<1>(r1, l < 8 ? row : tile + 1);
  put(0, r1, 1);
  bertkern::ptx::ldmatrix<1, true>(r1, l < 8 ? row : tile + 1);
  put(1, r1, 1);
  bertkern::ptx::ldmatrix<2>(r2, l < 16 ? row : tile + 1);
  put(2, r2, 2);
  bertkern::ptx::ldmatrix<2, true>(r2, l < 16 ? row : tile + 1);
  put(3, r2, 2);
  bertkern::ptx::ldmatrix<4>(r4, row);
  put(4, r4, 4);
  bertkern::ptx::ldmatrix<4, true>(r4, row);
  put(5, r4, 4);
}

// Lane l copies src[4l .. 4l + 3] (int32) to shared memory with src-size 4 (l % 5) bytes in group 0
// and src[128 + 4l ..] in group 1; out[k][l][0..3] is its destination of group 0 (k = 0: before any
// wait, 1: after wait_group 1, 3: after wait_all) and out[k][l][4..7] that of group 1 (k = 2: after
// wait_group 1, 3: after wait_all), as int32 bits.
__global__ void cp_async_kernel(const int32_t* src, int32_t* out) {
  BERTKERN_DYNAMIC_SMEM(smem);
  int32_t* d0 = reinterpret_cast<int32_t*>(smem) + 4 * threadIdx.x;
  int32_t* d1 = d0 + 128;
  const int l = threadIdx.x;
  bertkern::ptx::cp_async<16>(d0, src + 4 * l, 4 * (l % 5));
  bertkern::ptx::cp_async_commit();
  bertkern::ptx::cp_async<8>(d1, src + 128 + 4 * l, 8);
  bertkern::ptx::cp_async<8>(d1 + 2, src + 128 + 4 * l + 2, 4);
  auto snap = [&](int k, const int32_t* d, int half) {
    for (int x = 0; x < 4; ++x) out[(k * 32 + l) * 8 + 4 * half + x] = d[x];
  };
  snap(0, d0, 0);
  bertkern::ptx::cp_async_commit();
  bertkern::ptx::cp_async_wait<1>();
  snap(1, d0, 0);
  snap(2, d1, 1);
  bertkern::ptx::cp_async_wait_all();
  snap(3, d0, 0);
  snap(3, d1, 1);
}

// The emulation's thread orders (emu.h, $BERTKERN_EMU_SCHEDULE). Thread t takes a turn number from the
// counter out[3n] (emulated threads run one at a time) into out[t], writes t to its shared-memory slot,
// passes a warp barrier, takes a second turn into out[n + t], passes a block barrier if `barrier`, then
// reads the next thread's slot into out[2n + t] (-1: not written yet). Without the block barrier the
// last lane of a warp reads the next warp's slot in a race, whose result depends on the order.
__global__ void schedule_kernel(bool barrier, int32_t* out) {
  BERTKERN_DYNAMIC_SMEM(smem);
  int32_t* slot = reinterpret_cast<int32_t*>(smem);
  const int t = threadIdx.x, n = blockDim.x;
  out[t] = out[3 * n]++;
  slot[t] = t;
  __syncwarp();
  out[n + t] = out[3 * n]++;
  if (barrier) __syncthreads();
  out[2 * n + t] = slot[(t + 1) % n];
}

// Every block of a 4-block grid writes its index to out[0]: the last block to run wins.
__global__ void block_order_kernel(int32_t* out) {
  if (threadIdx.x == 0) out[0] = static_cast<int32_t>(blockIdx.x);
}

void ldmatrix_probe(at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == at::kLong && out.numel() == 6 * 32 * 4 && out.is_contiguous());
  bertkern::launch(ldmatrix_kernel, dim3(1), dim3(32), 32 * 16 * 2, nullptr, out.data_ptr<int64_t>());
}

void cp_async_probe(const at::Tensor& src, at::Tensor& out) {
  TORCH_CHECK(src.scalar_type() == at::kInt && src.numel() == 256 && src.is_contiguous());
  TORCH_CHECK(out.scalar_type() == at::kInt && out.numel() == 4 * 32 * 8 && out.is_contiguous());
  bertkern::launch(cp_async_kernel, dim3(1), dim3(32), 1024, nullptr, src.const_data_ptr<int32_t>(),
                   out.data_ptr<int32_t>());
}

void schedule_probe(bool barrier, at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == at::kInt && out.numel() == 3 * 64 + 1 && out.is_contiguous());
  out.zero_();
  bertkern::launch(schedule_kernel, dim3(1), dim3(64), 64 * 4, nullptr, barrier, out.data_ptr<int32_t>());
}

void block_order_probe(at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == at::kInt && out.numel() == 1);
  bertkern::launch(block_order_kernel, dim3(4), dim3(32), 0, nullptr, out.data_ptr<int32_t>());
}

}  // namespace probe

TORCH_LIBRARY_FRAGMENT(BERTKERN_OPS, m) {
  m.def("ldmatrix_probe(Tensor(a!) out) -> ()");
  m.def("cp_async_probe(Tensor src, Tensor(a!) out) -> ()");
  m.def("schedule_probe(bool barrier, Tensor(a!) out) -> ()");
  m.def("block_order_probe(Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(BERTKERN_OPS, BERTKERN_DEVICE, m) {
  m.impl("ldmatrix_probe", &probe::ldmatrix_probe);
  m.impl("cp_async_probe", &probe::cp_async_probe);
  m.impl("schedule_probe", &probe::schedule_probe);
  m.impl("block_order_probe", &probe::block_order_probe);
}
