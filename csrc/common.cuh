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
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, kAttr, device));
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
