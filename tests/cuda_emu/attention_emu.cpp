// csrc/attention.cu's kernels and host plans, run on CPU tensors through the emulation in emu.h, as
// the ops torch.ops.bertkern_cuda_emu.attention_fwd / attention_bwd (the schemas of the real
// bertkern_cuda ops). Built by tests/test_attention_emulated.py.
#define BERTKERN_EMULATE 1
#include "emu.h"

#include "attention.cu"  // csrc/ is on the include path

namespace bertkern::attn {

constexpr size_t kSmemBytes = 232448;  // the H100's per-block maximum
alignas(16) unsigned char smem[kSmemBytes];  // the kernels' `extern __shared__ ... smem[]`

auto emu_launcher(const Params& p) {
  return [&p](auto kernel, dim3 grid, int shared) {
    TORCH_CHECK(static_cast<size_t>(shared) <= kSmemBytes, "emulated launch: ", shared, " bytes of shared memory");
    emu::run_grid(kernel, grid, kThreads, p, smem, kSmemBytes);
  };
}

std::tuple<at::Tensor, at::Tensor> emu_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& mask,
                                                     const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                                     double scale, double dropout_p,
                                                     const std::optional<at::Tensor>& seed) {
  const FwdPlan plan = plan_fwd(q, k, v, mask, cu_seqlens, max_seqlen, scale, dropout_p, seed);
  dispatch_fwd(plan, emu_launcher(plan.p));
  return {plan.out, plan.stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emu_attention_bwd(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
    const at::Tensor& out, const at::Tensor& stats, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  const BwdPlan plan = plan_bwd(grad, q, k, v, mask, cu_seqlens, max_seqlen, out, stats, scale, dropout_p, seed);
  dispatch_bwd(plan, emu_launcher(plan.p));
  return {plan.dq, plan.dk, plan.dv};
}

}  // namespace bertkern::attn

TORCH_LIBRARY(bertkern_cuda_emu, m) {
  m.def(bertkern::attn::kFwdSchema);
  m.def(bertkern::attn::kBwdSchema);
}

TORCH_LIBRARY_IMPL(bertkern_cuda_emu, CPU, m) {
  m.impl("attention_fwd", &bertkern::attn::emu_attention_fwd);
  m.impl("attention_bwd", &bertkern::attn::emu_attention_bwd);
}
