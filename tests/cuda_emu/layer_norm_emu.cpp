// csrc/layer_norm.cu on the CPU: its ops as torch.ops.bertkern_cuda_emu.add_layer_norm_fwd / _bwd and embedding_layer_norm_fwd.
#include "emu.h"  // first: the emulated launch layer

#include "layer_norm.cu"  // csrc/ is on the include path
