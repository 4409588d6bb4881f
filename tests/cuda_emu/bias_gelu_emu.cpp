// csrc/bias_gelu.cu on the CPU: its ops as torch.ops.bertkern_cuda_emu.bias_gelu_fwd / _bwd.
#include "emu.h"  // first: the emulated launch layer

#include "bias_gelu.cu"  // csrc/ is on the include path
