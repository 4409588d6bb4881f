// csrc/masked_softmax.cu on the CPU: its ops as torch.ops.bertkern_cuda_emu.masked_softmax_fwd / _bwd.
#include "emu.h"  // first: the emulated launch layer

#include "masked_softmax.cu"  // csrc/ is on the include path
