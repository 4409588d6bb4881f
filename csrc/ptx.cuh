// Inline-PTX wrappers for the tensor-core kernels (sm_80+): ldmatrix, cp.async, ex2.approx.ftz.
// Written once so that the kernels read the same on the GPU and in tests/cuda_emu (BERTKERN_EMULATE:
// the emulation's emu::ldmatrix / emu::cp_async, which follow the PTX ISA's fragment layouts and
// defer cp.async copies to the wait, so a missing wait shows up as NaN in the tests).
//
// ldmatrix.m8n8.x<N>[.trans].shared.b16: lane i gives the address of row i % 8 of matrix i / 8 (16
// bytes, 16-byte aligned); r[m] gets matrix m's b16 pair at row lane / 4, columns 2 (lane % 4), +1
// (.trans: of the transposed matrix), i.e. exactly an mma.m16n8k16 A / B fragment register.
// cp.async: global -> shared without registers; src_bytes < bytes zero-fills the rest (0: no read).
#pragma once

#include <cstdint>

namespace bertkern {
namespace ptx {

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

template <int kMats, bool kTrans = false>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[kMats], const void* row_addr) {
  static_assert(kMats == 1 || kMats == 2 || kMats == 4, "ldmatrix: .x1, .x2 or .x4");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t a = smem_u32(row_addr);
  if constexpr (kMats == 4 && kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  } else if constexpr (kMats == 4) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  } else if constexpr (kMats == 2 && kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  } else if constexpr (kMats == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  } else if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  }
#elif defined(BERTKERN_EMULATE)
  emu::ldmatrix<kMats, kTrans>(r, row_addr);
#else
  __trap();  // the hosts refuse devices below sm_80
#endif
}

// cp.async of kBytes (4, 8 or 16): .cg (L2 only) for 16 bytes, .ca otherwise (.cg takes 16 only).
template <int kBytes>
__device__ __forceinline__ void cp_async(void* dst, const void* src, int src_bytes) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async: 4, 8 or 16 bytes");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_u32(dst)), "l"(src), "n"(kBytes),
                 "r"(src_bytes));
  }
#elif defined(BERTKERN_EMULATE)
  emu::cp_async(dst, src, kBytes, src_bytes);
#else
  __trap();
#endif
}

// 16 bytes from src + kOffset bytes, through L1 (.ca): the offset is the instruction's immediate (one
// address register for a row's chunks), and a row's two 16-byte halves of a 32-byte sector, copied by
// consecutive instructions, are one L2 read.
template <int kOffset>
__device__ __forceinline__ void cp_async_ca16(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1+%3], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes),
               "n"(kOffset));
#elif defined(BERTKERN_EMULATE)
  emu::cp_async(dst, static_cast<const char*>(src) + kOffset, 16, src_bytes);
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#elif defined(BERTKERN_EMULATE)
  emu::cp_async_commit();
#endif
}

// Every committed group but the newest kPending has landed (in this thread's view: a barrier makes
// the other threads' copies visible).
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#elif defined(BERTKERN_EMULATE)
  emu::cp_async_wait(kPending);
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#elif defined(BERTKERN_EMULATE)
  emu::cp_async_wait_all();
#endif
}

// Between blocks (the attention backward's ordered dQ accumulation): a flag read with acquire and
// written with release semantics at GPU scope, and fp32 quads read and written at L2 (.cg), where
// every SM sees the latest value; L1 may hold a line another block of this SM read before.
__device__ __forceinline__ int ld_acquire(const int* p) {
#if defined(__CUDA_ARCH__)
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
#else
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
#endif
}

__device__ __forceinline__ void st_release(int* p, int v) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
#else
  __atomic_store_n(p, v, __ATOMIC_RELEASE);
#endif
}

// Orders this thread's earlier writes before its later ones for every thread of the GPU (membar.gl).
__device__ __forceinline__ void fence_gpu() {
#if defined(__CUDA_ARCH__)
  __threadfence();
#else
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}

__device__ __forceinline__ float4 ld_cg(const float4* p) {
#if defined(__CUDA_ARCH__)
  float4 v;
  asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p) : "memory");
  return v;
#else
  return *p;
#endif
}

// ld_cg / st_cg of p + kOffset bytes (the instruction's immediate: one address register for a
// thread's chunks).
template <int kOffset>
__device__ __forceinline__ float4 ld_cg_at(const float4* p) {
#if defined(__CUDA_ARCH__)
  float4 v;
  asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4+%5];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p), "n"(kOffset) : "memory");
  return v;
#else
  return *reinterpret_cast<const float4*>(reinterpret_cast<const char*>(p) + kOffset);
#endif
}

template <int kOffset>
__device__ __forceinline__ void st_cg_at(float4* p, float4 v) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.global.cg.v4.f32 [%0+%5], {%1, %2, %3, %4};\n" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w),
               "n"(kOffset) : "memory");
#else
  *reinterpret_cast<float4*>(reinterpret_cast<char*>(p) + kOffset) = v;
#endif
}

__device__ __forceinline__ void st_cg(float4* p, float4 v) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.global.cg.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
               : "memory");
#else
  *p = v;
#endif
}

// A 16-byte (8-byte) shared-memory load as an asm volatile: it stays where it is among the other volatile
// asm (ldmatrix, mma), so that its registers are not held from an earlier point of the loop.
__device__ __forceinline__ float4 ld_shared_v4(const float4* p) {
#if defined(__CUDA_ARCH__)
  float4 v;
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(smem_u32(p)));
  return v;
#else
  return *p;
#endif
}

__device__ __forceinline__ float2 ld_shared_v2(const float2* p) {
#if defined(__CUDA_ARCH__)
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(smem_u32(p)));
  return v;
#else
  return *p;
#endif
}

// a * b rounded, never contracted into an FMA with a later add (whose result would then differ).
__device__ __forceinline__ float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// 2^x, one MUFU.EX2 (flush-to-zero: subnormal results become 0; ex2(-inf) = 0).
__device__ __forceinline__ float ex2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

}  // namespace ptx
}  // namespace bertkern
