// Shared helpers for every bertkern CUDA op (csrc/*.cu).
//
// Include this instead of <torch/extension.h>: that header drags in pybind11 and the whole torch
// C++ API, and nvcc parses a .cu file once per arch plus once for the host, so it costs ~100 s
// per file on 2 cores against ~20 s for the light set below. ATen/cuda/CUDAContext.h is left out
// on purpose too (it needs cuBLAS/cuSPARSE headers that are not in every toolkit).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace bertkern {

// fp32 math for 16-bit and fp32 inputs, fp64 for fp64 inputs (same rule as bertkern/reference.py).
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// V elements of T moved as one 16-byte (or smaller, when V * sizeof(T) < 16) load/store. The
// alignment makes nvcc emit one LDG.128/STG.128; callers must check the pointer really is aligned.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// Elements of T per 16-byte vector: 8 for fp16/bf16, 4 for fp32, 2 for fp64.
template <typename T>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));
}

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

inline bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename I>
constexpr I ceil_div(I a, I b) {
  return (a + b - 1) / b;
}

template <typename I>
constexpr I round_up(I a, I b) {
  return ceil_div(a, b) * b;
}

// ------------------------------------------------------------------ how host code reaches the GPU
// Every csrc/*.cu goes through these instead of <<<>>>, CUDAGuard and is_cuda() directly, so that
// tests/cuda_emu can compile the same files with BERTKERN_EMULATE defined and run the kernels on the
// CPU (CPU tensors, ops registered as torch.ops.bertkern_cuda_emu.*; see tests/cuda_emu/emu.h).
#ifndef BERTKERN_EMULATE
// The ops' namespace and dispatch key: TORCH_LIBRARY_FRAGMENT(BERTKERN_OPS, m),
// TORCH_LIBRARY_IMPL(BERTKERN_OPS, BERTKERN_DEVICE, m).
#define BERTKERN_OPS bertkern_cuda
#define BERTKERN_DEVICE CUDA
// The block's dynamic shared memory, as 16-byte aligned bytes.
#define BERTKERN_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]

inline bool is_device_tensor(const at::Tensor& t) { return t.is_cuda(); }

// The tensor's device made current for the scope, and its current stream.
class DeviceScope {
 public:
  explicit DeviceScope(const at::Tensor& t)
      : guard_(t.device()), stream_(c10::cuda::getCurrentCUDAStream(t.device().index()).stream()) {}
  cudaStream_t stream() const { return stream_; }

 private:
  c10::cuda::CUDAGuard guard_;
  cudaStream_t stream_;
};

// kernel<<<grid, block, smem, stream>>>(args...), then the launch-error check. More than 48 KiB of
// dynamic shared memory needs the kernel's opt-in first (sm_80+ allow up to 163 / 227 KiB).
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<grid, block, smem, stream>>>(static_cast<KArgs>(std::forward<Args>(args))...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif  // BERTKERN_EMULATE

// A device attribute, cached per device (the query is cheap but not free, and launches ask on every
// call). Racing first calls store the same value, so relaxed ordering is fine.
template <cudaDeviceAttr kAttr>
inline int cached_device_attribute(c10::DeviceIndex device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int value = 0;
#ifdef BERTKERN_EMULATE
  value = emu::device_attribute(kAttr);
#else
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, kAttr, device));
#endif
  if (cacheable) cache[device].store(value, std::memory_order_relaxed);
  return value;
}

// Streaming multiprocessors of a device.
inline int num_sms(c10::DeviceIndex device) {
  return cached_device_attribute<cudaDevAttrMultiProcessorCount>(device);
}

// Compute capability major of a device (8 = Ampere, 9 = Hopper).
inline int cc_major(c10::DeviceIndex device) {
  return cached_device_attribute<cudaDevAttrComputeCapabilityMajor>(device);
}

}  // namespace bertkern
