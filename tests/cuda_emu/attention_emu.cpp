// csrc/attention.cu on the CPU: its ops as torch.ops.bertkern_cuda_emu.attention_fwd / _bwd.
#include "emu.h"  // first: the emulated launch layer

#include "attention.cu"  // csrc/ is on the include path
