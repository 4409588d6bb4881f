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
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
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

// 1 / x with the bits of IEEE 1.0f / x, for x whose exponent is neither tiny nor huge (|x| in
// [2^-125, 2^125]) or NaN: a softmax sum in [1, N], 1 + exp(-t) in [1, 2]. It is ptxas's own fast path
// of that division (MUFU.RCP and one Newton step) without the branch to the slow path, a subroutine
// call around which ptxas spilled the values live across it. fp64 (and the emulation): a plain division.
__device__ __forceinline__ float rcp_in_range(float x) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return fmaf(r, -fmaf(x, r, -1.0f), r);
#else
  return 1.0f / x;
#endif
}
__device__ __forceinline__ double rcp_in_range(double x) { return 1.0 / x; }

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

// Check messages. TORCH_CHECK formats its message with std::ostringstream, and formatting a number
// that way inside bertkern._C crashed the process (segfault) on an H200 machine (nvcc build against
// torch 2.11); strings, dtypes and devices were fine. BK_CHECK turns numbers into strings with
// std::to_string first, and shape_str writes a shape or strides as "[8, 16]" the same way.
template <typename T>
decltype(auto) check_arg(const T& v) {
  if constexpr (std::is_arithmetic_v<T> && !std::is_same_v<T, bool> && !std::is_same_v<T, char>) {
    return std::to_string(v);
  } else {
    return (v);
  }
}

template <typename... Args>
std::string check_msg(const Args&... args) {
  return c10::str(check_arg(args)...);
}

#define BK_CHECK(cond, ...) TORCH_CHECK(cond, ::bertkern::check_msg(__VA_ARGS__))

inline std::string shape_str(c10::IntArrayRef dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
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

// More than 48 KiB of dynamic shared memory needs the kernel's opt-in (sm_80+ allow up to 163 / 227
// KiB): asked once per (kernel, device) and size, not on every launch.
inline void allow_dynamic_smem(const void* kernel, size_t smem) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> granted;
  const int device = c10::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mu);
  size_t& g = granted[{kernel, device}];
  if (smem <= g) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  g = smem;
}

// kernel<<<grid, block, smem, stream>>>(args...), then the launch-error check.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  if (smem > 48 * 1024) allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
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

// Resident blocks per SM of a kernel at a launch shape (at least 1), cached per (kernel, shape,
// device): launches that size a grid by it would otherwise query the runtime on every call.
template <typename... KArgs>
int blocks_per_sm(void (*kernel)(KArgs...), int threads, size_t smem, c10::DeviceIndex device) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, size_t>, int> cache;
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), static_cast<int>(device), threads, smem);
  const std::lock_guard<std::mutex> lock(mu);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem));
  return cache[key] = std::max(n, 1);
}

// ------------------------------------------------------------------ shared by the row ops
// The dtypes the row kernels are instantiated for.
inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// A [M, N] row-major input of a row op: defined, 2-D, on the device, a kernel dtype, unit stride
// along N. Messages name the op and the argument.
inline void check_rows(const char* op, const char* name, const at::Tensor& t) {
  BK_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  BK_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D [M, N], got ", t.dim(), "-D shape ",
              shape_str(t.sizes()));
  BK_CHECK(is_device_tensor(t), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  BK_CHECK(is_kernel_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  // A size-1 dim's stride is meaningless (as_rows may hand us one), so only N > 1 is checked.
  BK_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name,
              " must have unit stride in dim 1 (", name, ".stride(1) == 1), got strides ", shape_str(t.strides()));
}

// out[k][n] = sum_r partial[k][r, n] over `parts` rows of per-block partial sums (dbias, dweight, ...),
// for up to kMaxColumnSums sums of the same shape in one launch (blockIdx.y picks the sum). A block
// owns 32 columns (one coalesced 128-byte segment per warp of fp32) and 16 lanes that stride over the
// rows; the lanes are folded in a fixed order, so the sum is deterministic.
constexpr int kColumnSumCols = 32;
constexpr int kColumnSumLanes = 16;
constexpr int kMaxColumnSums = 3;

template <typename T, typename A>
struct ColumnSums {
  const A* partial[kMaxColumnSums];
  T* out[kMaxColumnSums];
  int count;
};

// Element k of a kernel parameter's array, read at constant indices: a run-time index would copy the
// parameter to the stack (56 bytes of local memory per thread).
template <typename P>
__device__ __forceinline__ P pick(const P (&v)[kMaxColumnSums], unsigned k) {
  return k == 0 ? v[0] : k == 1 ? v[1] : v[2];
}

template <typename T, typename A>
__global__ void __launch_bounds__(kColumnSumCols * kColumnSumLanes)
    column_sum_kernel(const ColumnSums<T, A> sums, int64_t parts, int64_t N) {
  __shared__ A lanes[kColumnSumLanes][kColumnSumCols];
  const A* __restrict__ partial = pick(sums.partial, blockIdx.y);
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kColumnSumCols + threadIdx.x;
  A s = A(0);
  if (n < N) {
    for (int64_t r = threadIdx.y; r < parts; r += kColumnSumLanes) s += partial[r * N + n];
  }
  lanes[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && n < N) {
    A total = lanes[0][threadIdx.x];
#pragma unroll
    for (int k = 1; k < kColumnSumLanes; ++k) total += lanes[k][threadIdx.x];
    pick(sums.out, blockIdx.y)[n] = static_cast<T>(total);
  }
}

template <typename T, typename A>
void column_sum(const ColumnSums<T, A>& sums, int64_t parts, int64_t N, cudaStream_t stream) {
  if (sums.count == 0) return;
  launch(column_sum_kernel<T, A>,
         dim3(static_cast<unsigned>(ceil_div<int64_t>(N, kColumnSumCols)), static_cast<unsigned>(sums.count)),
         dim3(kColumnSumCols, kColumnSumLanes), 0, stream, sums, parts, N);
}

template <typename T, typename A>
void column_sum(const A* partial, T* out, int64_t parts, int64_t N, cudaStream_t stream) {
  column_sum(ColumnSums<T, A>{{partial}, {out}, 1}, parts, N, stream);
}

}  // namespace bertkern
