// attention: out = dropout(softmax(q k^T * scale + mask)) v, fused (the S x S scores never reach
// memory), and its backward, as torch.ops.bertkern_cuda ops (bertkern.ops.attention calls them):
//
//   attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? cu_seqlens, int max_seqlen,
//                 float scale, float dropout_p, Tensor? seed) -> (Tensor out, Tensor stats)
//   attention_bwd(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? cu_seqlens,
//                 int max_seqlen, Tensor out, Tensor stats, float scale, float dropout_p,
//                 Tensor? seed) -> (Tensor dq, Tensor dk, Tensor dv)
//
// The contract is bertkern/triton/attention.py's, so the two backends are interchangeable:
// - Padded (cu_seqlens None): q [B, H, S_q, D], k / v [B, H, S_k, D], any strides with unit stride
//   along D (views of a packed QKV projection are read in place). out and the gradients are
//   [B, H, S, D] stored as [B, S, H, D]; stats is fp32 [2, B, H, S_q]: the row max of the logits and
//   1 / sum(exp(logits - max)), -inf and 0 for a fully masked row (whose out and gradients are 0).
// - Varlen: q / k / v [total, H, D] packed tokens, sequence b = tokens cu_seqlens[b] .. cu_seqlens[b+1]
//   (int32 or int64) attending only to itself; out / grads [total, H, D]; stats [2, H, total].
// - mask (padded only): a 4-D view of [B, H, S_q, S_k] read through its strides (stride 0 over
//   broadcast dims: a [B, 1, 1, S_k] padding mask is never materialised); bool (true = attend), or
//   additive fp32 / q's dtype, kept where value > lowest(dtype) (-inf and finfo.min mask a key, NaN
//   too). Masked keys become -inf by selection, never by addition. A mask that varies along queries
//   or heads (any 4-D mask) is read as fp32 tiles staged with cp.async, in place when it is fp32
//   with unit key stride and S_k a multiple of 64, else from a copy of its own elements (masked ->
//   -inf; broadcast dims stay stride 0): any_mask_f32.
// - dropout: the Philox scheme of philox.cuh on the [B, H, S_q, S_k] probabilities, row
//   (b * H + h) * R + i, column j, with R = S_q padded or max_seqlen varlen: the bits of
//   bertkern.reference.dropout_keep_mask, the Triton kernels and masked_softmax.
//
// Kernels (fp16 / bf16, head dim up to 128, sm_80+): tensor-core mma.sync.m16n8k16 with fp32
// accumulation, 4 warps per block; the operand tiles go through shared memory (rows padded by 16
// bytes: conflict-free fragment reads) and the fragments' register layouts are the PTX ISA's, so
// scores computed by one mma feed the next as its A operand with no shared-memory round trip (as in
// FlashAttention-2). The head dim is padded to 32, 64, 80 or 128 in shared memory (zeros), so one
// compiled kernel serves every D up to it.
// - forward (FlashAttention-2 shape): one block per 128 queries of one (b, h), each warp 32 rows,
//   streaming 64-key tiles: cp.async copies (V while Q K^T runs, the next K while P V runs),
//   ldmatrix.x4 fragments (.trans for V), an online softmax in base 2 over raw scores (row max of
//   q.k, then one FFMA per element before ex2.approx.ftz), the output staged through shared memory
//   for 16-byte stores. The mask kind (none / per-key / any 4-D) and dropout are template
//   parameters: no runtime branch on them in the key loop, whose full tiles have no bounds checks
//   (the last tile is peeled). Wrappers of the PTX it uses: ptx.cuh.
// - backward (FlashAttention-2's five GEMMs, no atomics, deterministic): delta = rowsum(dO * O), then
//   one kernel per 64 keys (each warp 16) streaming query tiles through two cp.async buffers:
//   S^T, dP^T, dV += P^T dO, dK += dS^T Q, and dS K, summed over key blocks into a zeroed fp32 dQ
//   accumulator in key-block order (a per-tile flag), which one more kernel turns into dQ. dS = P *
//   (dP - delta), P = 2^(logit - lse) in base 2 with ex2.approx; the key bias or mask tile and
//   -delta enter as the mma's C operands. Dropout and the mask kind (none or per-key / any 4-D)
//   are template parameters.
// Registers, spills and SASS without a GPU or a full build (T = torch's include folder; sm_80 alike):
//   nvcc -cubin -O3 -std=c++20 -gencode arch=compute_90,code=sm_90 -Xptxas -v --expt-relaxed-constexpr
//        -IT -IT/torch/csrc/api/include csrc/attention.cu -o attention.cubin
//   $(python -c "import triton; print(triton.knobs.nvidia.cuobjdump.path)") -sass attention.cubin
// Not yet here: an opt-in atomicAdd dQ (no waiting for turns, not deterministic; worth it only if
// measured faster), 32-row warps in the backward, wgmma on sm_90.
#include "common.cuh"
#include "philox.cuh"
#include "ptx.cuh"

#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace bertkern {
namespace attn {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerBlock = kWarps * 16;  // rows (queries, or keys in dK/dV) owned by one block
constexpr int kPad = 8;                     // 16 bytes of padding per shared-memory row
constexpr int kMaxHeadDim = 128;
constexpr unsigned kFull = 0xffffffffu;

// ------------------------------------------------------------------ parameters
struct Strides {  // batch, head, token strides in elements (unit stride along D); batch is 0 varlen
  int64_t b, h, s;
};

struct Params {
  const void* q;
  const void* k;
  const void* v;
  const void* out;   // backward: the forward's output
  const void* dout;  // backward: the incoming gradient
  void* o;           // forward: out; backward: unused
  void* dq;
  void* dk;
  void* dv;
  Strides sq, sk, sv, so, sdo, sdq, sdk, sdv;
  bool vq, vk, vv, vdo, vo;  // 16-byte vector loads / stores allowed (D % 8 == 0, strides % 8 == 0, aligned)

  const void* mask;  // nullptr: none
  int mask_kind;     // 0 none, 1 bool (one byte), 2 fp32 additive, 3 q's dtype additive
  int64_t mb, mh, mq, mk;
  float mask_lowest;

  const void* cu;  // varlen cumulative lengths, nullptr when padded
  bool cu64;

  float* stats;        // [2, ...]: row max, 1 / row sum
  float* delta;        // backward: rowsum(dO * O), laid out like one plane of stats
  int64_t st_b, st_h;  // stats / delta strides (batch 0 varlen); token stride 1
  int64_t plane;       // stats plane stride

  int H, S_q, S_k, D;
  int64_t row_stride;  // dropout rows per (b, h): S_q padded, max_seqlen varlen
  float scale;
  float scale_abs, scale_log2, inv_scale;  // forward: |scale| (1 for a scale of 0), times log2 e, 1 / it
  float keep_scale;
  const int64_t* seed;  // nullptr: no dropout
  uint32_t thresh;

  float* dq_acc;  // backward: fp32 dQ parts summed over key blocks (rows of D rounded up to 4), or nullptr
  Strides sacc;   // its batch, head, token strides in floats
  int* dq_sem;    // backward: per (b, h, query tile), the key block whose turn it is to add (zeros)
  int q_tiles;    // query tiles per (b, h)
};

// ------------------------------------------------------------------ 16-bit types and mma.sync
// d = a b + c, mma.sync.m16n8k16 with fp32 accumulation; kType is the PTX operand type (f16 / bf16).
#define BERTKERN_MMA_16816(kType)                                                                          \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." kType "." kType                                   \
               ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"                \
               : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                          \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]),     \
                 "f"(c[2]), "f"(c[3]))
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                          const float (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    BERTKERN_MMA_16816("f16");
  } else {
    BERTKERN_MMA_16816("bf16");
  }
#elif defined(BERTKERN_EMULATE)
  float acc[4] = {c[0], c[1], c[2], c[3]};
  emulate_mma<T>(acc, a, b0, b1);  // tests/cuda_emu: the kernels run on the CPU
  for (int e = 0; e < 4; ++e) d[e] = acc[e];
#else
  __trap();  // the host refuses devices below sm_80
#endif
}
#undef BERTKERN_MMA_16816

// Tiles are moved as raw 16-bit words (uint16_t): zero bits are 0.0 in fp16 and bf16 alike.
template <typename T>
struct Half16;

template <>
struct Half16<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);  // lo in the low 16 bits: the lower k / n index
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ uint16_t bits(float x) { return __half_as_ushort(__float2half_rn(x)); }
  static __device__ __forceinline__ float to_float(uint16_t x) { return __half2float(__ushort_as_half(x)); }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_16816<__half>(c, a, b0, b1, c);
  }
};

template <>
struct Half16<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ uint16_t bits(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
  static __device__ __forceinline__ float to_float(uint16_t x) {
    return __bfloat162float(__ushort_as_bfloat16(x));
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_16816<__nv_bfloat16>(c, a, b0, b1, c);
  }
};

// Register layouts of mma.m16n8k16 (PTX ISA), lane = 4 * g + t:
//   A (16 x 16, row-major): a[0] = (row g, k 2t, 2t+1), a[1] = (row g+8, k 2t, 2t+1),
//                           a[2] = (row g, k 2t+8, 2t+9), a[3] = (row g+8, k 2t+8, 2t+9)
//   B (16 x 8, "col"):      b0 = (k 2t, 2t+1; col g), b1 = (k 2t+8, 2t+9; col g)
//   C (16 x 8, fp32):       c[0], c[1] = (row g, col 2t, 2t+1), c[2], c[3] = (row g+8, col 2t, 2t+1)
// So the C tiles of columns 16kk .. 16kk+7 and 16kk+8 .. 16kk+15 are, packed to 16 bits, the A
// operand of a product over k = those 16 columns.

// ldmatrix row addresses (element offsets) of lane `lane` for the fragments of a row-major smem
// tile with row stride LD: lane gives row lane % 8 of 8x8 matrix lane / 8 (ptx.cuh).
//   A (16 x 16 at row0): matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (0-7, 8-15), (8-15, 8-15)
//   B of two n8 tiles, from rows n (K in Q K^T): (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7),
//     (n 8-15, k 8-15) -> b0, b1 of tile 0, b0, b1 of tile 1
//   B of two n8 tiles, from rows k (V in P V; .trans): (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15),
//     (k 8-15, n 8-15) -> the same registers
template <int LD>
__device__ __forceinline__ int a_frag_offset(int row0, int lane) {
  return (row0 + lane % 16) * LD + 8 * (lane / 16);
}
template <int LD>
__device__ __forceinline__ int b_frag_offset(int lane) {
  return (8 * (lane / 16) + lane % 8) * LD + 8 * ((lane / 8) % 2);
}
template <int LD>
__device__ __forceinline__ int bt_frag_offset(int lane) {
  return (8 * ((lane / 8) % 2) + lane % 8) * LD + 8 * (lane / 16);
}

// acc[j] (+)= A (16 x kD, rows row0.. of sa) times B^T, B = rows 8j .. 8j+7 of sb (kD wide): the
// "row-major times transposed row-major" product (Q K^T, dO V^T, K Q^T, V dO^T).
template <typename T, int kD, int kN, int LD>
__device__ __forceinline__ void mma_abt(float (&acc)[kN / 8][4], const uint16_t* sa, int row0, const uint16_t* sb,
                                        int lane) {
  const uint16_t* pa = sa + a_frag_offset<LD>(row0, lane);
  const uint16_t* pb = sb + b_frag_offset<LD>(lane);
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    uint32_t a[4];
    ptx::ldmatrix<4>(a, pa + 16 * kk);
#pragma unroll
    for (int jp = 0; jp < kN / 16; ++jp) {
      uint32_t bk[4];
      ptx::ldmatrix<4>(bk, pb + 16 * jp * LD + 16 * kk);
      Half16<T>::mma(acc[2 * jp], a, bk[0], bk[1]);
      Half16<T>::mma(acc[2 * jp + 1], a, bk[2], bk[3]);
    }
  }
}

// acc[jd] += P (16 x kK, fp32 C layout in p) times B, B = the kK x kD row-major smem tile sb: the
// "scores times values" product (P V, P^T dO, dS^T Q, dS K).
template <typename T, int kD, int kK, int LD>
__device__ __forceinline__ void mma_pb(float (&acc)[kD / 8][4], const float (&p)[kK / 8][4], const uint16_t* sb,
                                       int lane) {
  const uint16_t* pv = sb + bt_frag_offset<LD>(lane);
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    const uint32_t a[4] = {Half16<T>::pack(p[2 * kk][0], p[2 * kk][1]), Half16<T>::pack(p[2 * kk][2], p[2 * kk][3]),
                           Half16<T>::pack(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                           Half16<T>::pack(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int dp = 0; dp < kD / 16; ++dp) {
      uint32_t bv[4];
      ptx::ldmatrix<4, true>(bv, pv + 16 * kk * LD + 16 * dp);
      Half16<T>::mma(acc[2 * dp], a, bv[0], bv[1]);
      Half16<T>::mma(acc[2 * dp + 1], a, bv[2], bv[3]);
    }
  }
}

// ------------------------------------------------------------------ tiles, sequences, logits
struct Seq {
  int64_t tok0;  // first token of the sequence in the packed tensors (0 padded)
  int Lq, Lk;
};

__device__ __forceinline__ Seq seq_of(const Params& p, int b) {
  if (p.cu == nullptr) return {0, p.S_q, p.S_k};
  int64_t lo, hi;
  if (p.cu64) {
    lo = static_cast<const int64_t*>(p.cu)[b];
    hi = static_cast<const int64_t*>(p.cu)[b + 1];
  } else {
    lo = static_cast<const int32_t*>(p.cu)[b];
    hi = static_cast<const int32_t*>(p.cu)[b + 1];
  }
  const int n = static_cast<int>(hi - lo);
  return {lo, n, n};
}

__device__ __forceinline__ const uint16_t* at_token(const void* base, const Strides& s, int b, int h, int64_t tok) {
  return static_cast<const uint16_t*>(base) + b * s.b + h * s.h + tok * s.s;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFull, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFull, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFull, x, 1);
  return x + __shfl_xor_sync(kFull, x, 2);
}

// Stores rows (row0 + g, row0 + g + 8) of a 16 x kD fp32 C-layout block, times row_scale[r], into
// a [*, D] row block of 16-bit T (rows >= valid skipped).
template <typename T, int kD>
__device__ __forceinline__ void store_rows(void* base, int64_t stride, int row0, int valid, int D,
                                           const float (&acc)[kD / 8][4], const float (&row_scale)[2], int g,
                                           int t) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + g + 8 * r;
    if (row >= valid) continue;
    uint16_t* out = static_cast<uint16_t*>(base) + row * stride;
#pragma unroll
    for (int jd = 0; jd < kD / 8; ++jd) {
      const int col = 8 * jd + 2 * t;
      const float x0 = acc[jd][2 * r] * row_scale[r], x1 = acc[jd][2 * r + 1] * row_scale[r];
      if (col + 1 < D && (D % 2 == 0) && (stride % 2 == 0)) {
        *reinterpret_cast<uint32_t*>(out + col) = Half16<T>::pack(x0, x1);
      } else {
        if (col < D) out[col] = Half16<T>::bits(x0);
        if (col + 1 < D) out[col + 1] = Half16<T>::bits(x1);
      }
    }
  }
}

// ------------------------------------------------------------------ forward (FlashAttention-2 shape)
// One block of 4 warps per 128 queries of one (b, h); each warp owns 32 rows (two m16 tiles), so
// every K / V fragment read from shared memory feeds two mma instead of one (half the ldmatrix
// traffic of 8 warps x 16 rows). The cost is registers: O (2 x kD / 8 x 4 fp32) + S (2 x 8 x 4) is
// 128 + 64 at kD = 128, which still fits 255 without spills; 8 x 16 would need fewer registers but
// twice the shared-memory reads per mma, and shared-memory bandwidth is what mma.sync kernels run
// out of first. Keys stream in tiles of 64 (32 at kD = 80 and 128, where O takes 80 / 128
// registers: 64 keys spilled on sm_80 with dropout) with FA2's overlap, one K and one V buffer:
//   V[j] is copied (cp.async) while S = Q K[j]^T and the softmax run;
//   K[j+1] is copied while O += P V[j] runs.
// What the key loop issues beyond the mma and ex2 (SASS per 128 mma at kD = 64, sm_90: 558 with no
// mask, 604 with a per-key mask, against 776 / 823 before): S starts from the tiles' key bias as
// the first mma's C operand (a float4 per column pair in shared memory, 0 / -inf / mask / scale),
// so masking costs one load per 2 columns; the row max is of raw scores and 2^(s sl2 - max sl2) one
// FFMA per element (a scale <= 0 is folded into Q in shared memory first); the row sums come from one
// more mma of P against ones per 16 keys (the sum of P as rounded for P V) instead of 64 FADD; full
// tiles are copied with no row checks from one pointer per thread, the last tile (partial, with the
// bias of keys past Lk) is peeled; inputs that do not allow 16-byte copies are copied by the host.
// Any 4-D mask: its fp32 tile is staged with the next K (MaskTile) and its pairs, times 1 / |scale|,
// are the first mma's C operand (FMUL + FMNMX per element; 750 SASS per 136 mma, 2577 before).
// Fragments come from ldmatrix.x4 (Q, K) and ldmatrix.x4.trans (V, so no transposed copy); rows are
// padded by 16 bytes, which makes the 8 row addresses of every 8x8 matrix hit distinct banks.
namespace fwd {
constexpr int kM = 128;  // queries per block
constexpr int kMT = 2;   // m16 tiles per warp
enum Mask { kNoMask = 0, kKeyMask = 1, kAnyMask = 2 };  // none, [B,1,1,S_k] broadcast, strided 4-D
// 32 keys per tile with dropout too (but for any 4-D mask): its Philox state on top of 64 scores
// per thread spilled.
constexpr int key_tile(int kD, bool dropout, int mask) { return kD > 64 || (dropout && mask != kAnyMask) ? 32 : 64; }
constexpr float kLog2e = 1.4426950408889634f;

// Row stride (floats) of the staged 4-D mask tile: 8 floats of padding make the float2 reads of a
// C fragment (8 rows x 4 pairs) conflict-free.
constexpr int mask_ld(int kN) { return kN + 8; }
constexpr int smem_bytes(int kD, bool dropout, int mask) {
  return (kM + 2 * key_tile(kD, dropout, mask)) * (kD + kPad) * 2 + key_tile(kD, dropout, mask) * 8 +
         (mask == kAnyMask ? kM * mask_ld(key_tile(kD, dropout, mask)) * 4 : 0);
}
}  // namespace fwd

// TileCopy's element-by-element path (D % 8 != 0 or unaligned views), out of line so that
// the key loop's code is the 16-byte path's.
#if defined(__CUDACC__)
#define BERTKERN_NOINLINE __noinline__
#else
#define BERTKERN_NOINLINE  // the CPU emulation's g++ (no __noinline__ there; inlining is harmless)
#endif
template <int kRows, int kD, int LD>
__device__ BERTKERN_NOINLINE void load_tile_slow(uint16_t* s, const uint16_t* g, int64_t stride, int valid, int D) {
  for (int e = threadIdx.x; e < kRows * kD; e += kThreads) {
    const int r = e / kD, col = e % kD;
    s[r * LD + col] = r < valid && col < D ? g[r * stride + col] : uint16_t(0);
  }
}

// Copies of kRows x kD tiles of a global [*, D] row block (row stride `stride`) into smem
// [kRows][LD]: 16-byte cp.async, zero-filled past `valid` rows and past D, when `vec`; else
// element copies (visible after the next barrier, as the asynchronous ones after their wait).
// When kD / 8 divides the block, a thread's chunks share one column and step down by kStep rows:
// a whole tile (copy_full) is kPer cp.async from one pointer per thread, with no bounds checks.
template <int kRows, int kD, int LD>
struct TileCopy {
  static constexpr int kChunks = kD / 8, kPer = ceil_div(kRows * kChunks, kThreads);
  static constexpr bool kFixed = kThreads % kChunks == 0;
  static constexpr int kStep = kFixed ? kThreads / kChunks : 0;
  static_assert(!kFixed || kRows * kChunks % kThreads == 0, "whole chunks per thread");

  // kFixed: the thread's first chunk in the current tile (its column, or column 0 past D); else
  // the tile's first row.
  const uint16_t* ptr;
  int64_t stride;

  __device__ __forceinline__ TileCopy(const uint16_t* g, int64_t stride_, int D) : ptr(g), stride(stride_) {
    if constexpr (kFixed) ptr += offset(D);
  }
  __device__ __forceinline__ int64_t offset(int D) const {
    const int r0 = threadIdx.x / kChunks, col = threadIdx.x % kChunks * 8;
    return r0 * stride + (col < D ? col : 0);
  }
  __device__ __forceinline__ const uint16_t* tile(int D) const { return kFixed ? ptr - offset(D) : ptr; }

  __device__ __forceinline__ void copy(uint16_t* s, int valid, int D, bool vec) const {
    const uint16_t* t = tile(D);
    if (!vec) {
      load_tile_slow<kRows, kD, LD>(s, t, stride, valid, D);
    } else if constexpr (kFixed) {
      const int r0 = threadIdx.x / kChunks, col = threadIdx.x % kChunks * 8;
      // (a row past `valid` copies nothing from its address: src-size 0, as CUTLASS's zfill copies)
      const int left = col < D ? valid - r0 : 0;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        ptx::cp_async<16>(s + (r0 + i * kStep) * LD + col, ptr + i * kStep * stride, i * kStep < left ? 16 : 0);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int c = threadIdx.x + i * kThreads, r = c / kChunks, cl = (c % kChunks) * 8;
        if (kRows * kChunks % kThreads != 0 && c >= kRows * kChunks) break;  // 32 x 80: 2.5 per thread
        const bool in = r < valid && cl < D;
        ptx::cp_async<16>(s + r * LD + cl, in ? t + r * stride + cl : t, in ? 16 : 0);
      }
    }
  }

  // A tile of kRows valid rows, 16-byte copies (the forward's key loop).
  __device__ __forceinline__ void copy_full(uint16_t* s, int D) const {
    if constexpr (kFixed) {
      const int r0 = threadIdx.x / kChunks, col = threadIdx.x % kChunks * 8;
#pragma unroll
      for (int i = 0; i < kPer; ++i) ptx::cp_async<16>(s + (r0 + i * kStep) * LD + col, ptr + i * kStep * stride, col < D ? 16 : 0);
    } else {
      copy(s, kRows, D, true);
    }
  }

  __device__ __forceinline__ void next() { ptr += kRows * stride; }
};

// Any 4-D mask (kAnyMask) as the kernels read it: fp32, unit stride along keys, rows 16-byte aligned,
// a (b, h) plane's row offsets within int32 (the host converts other masks once, over their own
// elements: a broadcast dim stays stride 0; any_mask_f32). A kRows x kCols tile (rows = queries,
// columns = keys) is staged in shared memory [kRows][LDM] with 16-byte cp.async, one row per
// kThreads / kRows threads (chunks interleaved): one address register per thread, the chunks'
// offsets immediate. Rows past `rows` read the last valid row (theirs are never stored); when
// kChecked (the last key tile), chunks not wholly below `cols` are written element by element with
// -inf past it (visible after the next barrier, as the copies after their wait), so that no key
// bias is needed.
template <int kRows, int kCols, int LDM>
struct MaskTile {
  static constexpr int kTPR = kThreads / kRows, kPer = kCols / 4 / kTPR;
  static_assert(kThreads % kRows == 0 && kCols % (4 * kTPR) == 0, "one row per thread group, whole chunks");
  // (the thread's row address is computed from these per copy, not held across the key loop)
  const float* plane;  // key 0 of row 0 of this (b, h)
  int mq, row0, rows;  // row stride; the tile's first row; the valid rows
  float* s;

  // Keys col0 .. col0 + kCols - 1 (valid: cols of them when kChecked).
  template <bool kChecked>
  __device__ __forceinline__ void copy(int col0, int cols) const {
    const int r = threadIdx.x / kTPR, c = 4 * (threadIdx.x % kTPR);
    const float* src = plane + (row0 + r < rows ? row0 + r : rows - 1) * mq + c + col0;
    copy_chunks<kChecked>(reinterpret_cast<char*>(s + r * LDM + c), src, cols - c);
  }
  template <bool kChecked, int kC = 0>
  static __device__ __forceinline__ void copy_chunks(char* dst, const float* src, int left) {
    if constexpr (kC < kPer) {
      constexpr int kOff = 16 * kTPR * kC;  // bytes
      if (!kChecked || left - kOff / 4 >= 4) {
        ptx::cp_async_ca16<kOff>(dst + kOff, src, 16);
      } else {
        float* d = reinterpret_cast<float*>(dst + kOff);
        const float* g = src + kOff / 4;
        for (int e = 0; e < 4; ++e) d[e] = e < left - kOff / 4 ? g[e] : -INFINITY;
      }
      copy_chunks<kChecked, kC + 1>(dst, src, left);
    }
  }
};

// A mask value in the kernels' raw units (times 1 / |scale|), -inf where masked: NaN gives -inf
// (fmax), and the host makes sure that its lowest value (masked) overflows to -inf (any_mask_f32).
__device__ __forceinline__ float mask_raw(float m, float inv_scale) { return fmaxf(m * inv_scale, -INFINITY); }

// The additive bias of key j, in units of `unit` (log2 e: base 2): -inf where masked or j >= Lk
// (so the last, partial tile needs no other check), else 0 or the mask value * unit.
template <typename T, int kMask>
__device__ __forceinline__ float key_bias(const Params& p, int64_t mbase, int j, int Lk, float unit) {
  if (j >= Lk) return -INFINITY;
  if constexpr (kMask != fwd::kKeyMask) return 0.f;
  const int64_t off = mbase + j * p.mk;
  if (p.mask_kind == 1) return static_cast<const uint8_t*>(p.mask)[off] ? 0.f : -INFINITY;
  const float m = p.mask_kind == 2 ? static_cast<const float*>(p.mask)[off]
                                   : Half16<T>::to_float(static_cast<const uint16_t*>(p.mask)[off]);
  return m > p.mask_lowest ? m * unit : -INFINITY;  // NaN masks too
}

// The forward's key bias in shared memory: the bias of keys 2c, 2c + 1 of the tile as the float4
// (b[2c], b[2c + 1], b[2c], b[2c + 1]), which is the C operand of the mma giving S's columns 2c, 2c + 1
// (rows g and g + 8), so that S = bias + Q K^T costs no instruction beyond the load.
__device__ __forceinline__ void put_bias(float4* sbias, int n, float b) {
  float* q = reinterpret_cast<float*>(sbias + n / 2);
  q[n % 2] = b;
  q[n % 2 + 2] = b;
}

// (Launch bounds with min 1 block: without it ptxas capped some variants at 168 registers on sm_80
// and spilled, as in the backward.)
template <typename T, int kD, int kMask, bool kDropout>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_kernel(const Params p) {
  using namespace fwd;
  constexpr int kN = key_tile(kD, kDropout, kMask), LD = kD + kPad, kNT = kN / 8, kDT = kD / 8;
  // Q fragments are re-read from shared memory for every key tile (as FA2 does): keeping them in
  // registers (32 more at kD = 64) pushed the dropout and key-mask variants into spills.
  BERTKERN_DYNAMIC_SMEM(smem);
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem);  // [kM][LD]; the output tile at the end
  uint16_t* sK = sQ + kM * LD;                       // [kN][LD]
  uint16_t* sV = sK + kN * LD;                       // [kN][LD]
  float4* sBias = reinterpret_cast<float4*>(sV + kN * LD);  // [kN / 2]: the tile's key bias (put_bias)
  constexpr int LDM = mask_ld(kN);
  float* sMask = reinterpret_cast<float*>(sBias + kN / 2);  // [kM][LDM]: any 4-D mask's tile

  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * kM;
  const Seq seq = seq_of(p, b);
  if (m0 >= seq.Lq) return;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int row0 = warp * (16 * kMT);  // the warp's first row in the tile
  // The thread's queries: rows g and g + 8 of each m16 tile, q0 + 16 mt + 8 r (one register, not four).
  const int q0 = m0 + row0 + g;

  // The scores are kept in units of q.k (raw): the softmax takes the row max of raw scores and
  // 2^(s * sl2 - max * sl2), one FFMA per element. That needs sl2 > 0: a scale <= 0 is applied to
  // Q in shared memory (sign flipped, or Q zeroed for a scale of 0, whose logits are the mask alone).
  const float sl2 = p.scale_log2, inv_se = p.inv_scale;

  const uint16_t* k = at_token(p.k, p.sk, b, h, seq.tok0);
  const uint16_t* v = at_token(p.v, p.sv, b, h, seq.tok0);
  const int64_t mbase = b * p.mb + h * p.mh;
  Dropout drop{};
  if constexpr (kDropout) drop = make_dropout(p.seed, p.thresh);
  // (the dropout row's low 32 bits: all keep8_at takes; one register less)
  const uint32_t drow = static_cast<uint32_t>((static_cast<int64_t>(b) * p.H + h) * p.row_stride);
  const int tok0 = static_cast<int>(seq.tok0);  // (the host checks that token counts fit in int)

  // ldmatrix row addresses of this lane (element offsets) in sQ, sK, sV.
  const int a_off = a_frag_offset<LD>(row0, lane), k_off = b_frag_offset<LD>(lane), v_off = bt_frag_offset<LD>(lane);

  // Key tiles at 0, kN, 2 kN, ..: the loop runs the full ones before the last, with whole-tile
  // copies and no bounds checks; the last one (n_last, maybe partial) is peeled: its keys from Lk
  // on get a bias of -inf. With dropout one loop runs every tile with those checks (kGeneral): two
  // copies of the loop body there pushed the kernel into spills.
  constexpr bool kGeneral = kDropout;
  const int n_last = seq.Lk > kN ? (seq.Lk - 1) / kN * kN : 0;
  auto tile_bias = [&](int n0, int j) { return key_bias<T, kMask>(p, mbase, n0 + j, seq.Lk, inv_se); };

  // Prologue: Q and K[0] in one group; the first tile's key bias (the last tile's without a per-key mask).
  TileCopy<kN, kD, LD> k_copy(k, p.sk.s, p.D), v_copy(v, p.sv.s, p.D);
  TileCopy<kM, kD, LD>(at_token(p.q, p.sq, b, h, seq.tok0 + m0), p.sq.s, p.D).copy(sQ, seq.Lq - m0, p.D, true);
  k_copy.copy(sK, seq.Lk, p.D, true);
  const MaskTile<kM, kN, LDM> m_copy{static_cast<const float*>(p.mask) + mbase, static_cast<int>(p.mq), m0, seq.Lq,
                                     sMask};
  if constexpr (kMask == kAnyMask) m_copy.template copy<true>(0, seq.Lk);
  ptx::cp_async_commit();
  if (tid < kN) put_bias(sBias, tid, tile_bias(kMask == kKeyMask || kGeneral ? 0 : n_last, tid));
  ptx::cp_async_wait<0>();
  __syncthreads();
  if (!(p.scale > 0.f)) {
    uint32_t* q2 = reinterpret_cast<uint32_t*>(sQ);
    for (int e = tid; e < kM * LD / 2; e += kThreads) q2[e] = p.scale < 0.f ? q2[e] ^ 0x80008000u : 0u;
    __syncthreads();
  }

  float o[kMT][kDT][4] = {};
  // Running max of the raw scores; row sums: l_run (this thread's columns only, with dropout) or
  // l_acc (an mma accumulator whose elements 0 and 2 are the whole sums of rows g and g + 8).
  float m_run[kMT][2], l_run[kMT][2] = {}, l_acc[kMT][4] = {};
  const uint32_t kOnes = Half16<T>::pack(1.f, 1.f);
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) m_run[mt][0] = m_run[mt][1] = -INFINITY;

  // The C fragment of the mask tile at m16 tile mt, n8 tile j: rows g, g + 8, keys 2t, 2t + 1 (raw units).
  auto mask_frag = [&](float (&c)[4], int mt, int j) {
    const float* sm = sMask + (row0 + 16 * mt + g) * LDM + 8 * j + 2 * t;
    const float2 lo = *reinterpret_cast<const float2*>(sm), hi = *reinterpret_cast<const float2*>(sm + 8 * LDM);
    c[0] = mask_raw(lo.x, inv_se), c[1] = mask_raw(lo.y, inv_se), c[2] = mask_raw(hi.x, inv_se);
    c[3] = mask_raw(hi.y, inv_se);
  };

  // One key tile at n0; kLast: the last one (the only one with the bias of out-of-range keys);
  // kGeneral: any tile, with the checks of the last one.
  auto key_step = [&](int n0, auto last) {
    constexpr bool kLast = decltype(last)::value || kGeneral;
    // S starts from the key bias (any 4-D mask: from the mask tile, which masks keys past Lk), else from 0
    constexpr bool kBias = kMask == kKeyMask || (kLast && kMask != kAnyMask);
    if constexpr (kLast) {
      v_copy.copy(sV, seq.Lk - n0, p.D, true);
      if constexpr (kGeneral) v_copy.next();
    } else {
      v_copy.copy_full(sV, p.D);
      v_copy.next();
    }
    ptx::cp_async_commit();

    // S = bias + Q K^T: per 16-wide k step, one ldmatrix.x4 gives the B fragments of two n8 tiles.
    float s[kMT][kNT][4];
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) ptx::ldmatrix<4>(a[mt], sQ + a_off + 16 * mt * LD + 16 * kk);
#pragma unroll
      for (int jp = 0; jp < kNT / 2; ++jp) {
        uint32_t bk[4];
        ptx::ldmatrix<4>(bk, sK + k_off + 16 * jp * LD + 16 * kk);
#pragma unroll
        for (int x = 0; x < 2; ++x) {
          const int j = 2 * jp + x;
          if (kk == 0) {
            float c[4] = {};
            if constexpr (kBias) {
              const float4 c4 = ptx::ld_shared_v4(sBias + 4 * j + t);
              c[0] = c4.x, c[1] = c4.y, c[2] = c4.z, c[3] = c4.w;
            }
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) {
              if constexpr (kMask == kAnyMask && !kDropout) {
                // C = the mask's pairs of rows g, g + 8 (raw units; -inf past Lk, see MaskTile).
                float cm[4];
                mask_frag(cm, mt, j);
                mma_16816<T>(s[mt][j], a[mt], bk[2 * x], bk[2 * x + 1], cm);
              } else {
                mma_16816<T>(s[mt][j], a[mt], bk[2 * x], bk[2 * x + 1], c);
              }
            }
          } else {
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) Half16<T>::mma(s[mt][j], a[mt], bk[2 * x], bk[2 * x + 1]);
          }
        }
      }
    }

    if constexpr (kMask == kAnyMask && kDropout) {
      // (added after the mma with dropout: as their C operand, the mask values were loaded early
      // and spilled next to the Philox state)
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          float c[4];
          mask_frag(c, mt, j);
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][j][e] += c[e];
        }
      }
    }

    // Online softmax in base 2: m = running max (raw), O and l rescaled by 2^((m_old - m_new) sl2).
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = m_run[mt][r];
#pragma unroll
        for (int j = 0; j < kNT; ++j) mx = fmaxf(mx, fmaxf(s[mt][j][2 * r], s[mt][j][2 * r + 1]));
        mx = quad_max(mx);
        // (no key yet, mx = -inf: a finite shift, so that 2^(-inf - shift) = 0, not NaN; alpha is
        // exactly 1 when the max stays (m sl2 rounded alike both times, not an FFMA's residue), so
        // that a tile of masked keys changes no bit of O or l)
        const float shift = fmaxf(ptx::mul_rn(mx, sl2), -FLT_MAX);
        const float alpha = ptx::ex2(ptx::mul_rn(m_run[mt][r], sl2) - shift);
        m_run[mt][r] = mx;
        [[maybe_unused]] float sum = 0.f;
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
#pragma unroll
          for (int x = 0; x < 2; ++x) {
            s[mt][j][2 * r + x] = ptx::ex2(fmaf(s[mt][j][2 * r + x], sl2, -shift));
            if constexpr (kDropout) sum += s[mt][j][2 * r + x];  // the sum is over probabilities before dropout
          }
        }
        if constexpr (kDropout) {
          l_run[mt][r] = l_run[mt][r] * alpha + sum;
        } else {
          l_acc[mt][2 * r] *= alpha;  // the row sum comes from P V (below)
        }
#pragma unroll
        for (int jd = 0; jd < kDT; ++jd) o[mt][jd][2 * r] *= alpha, o[mt][jd][2 * r + 1] *= alpha;
      }
    }
    if constexpr (kDropout) {
      // One Philox call gives the 8 columns of an n8 tile of a row. The 4 lanes sharing g hold rows
      // g, g + 8 of tiles j, j + 1 (columns 2t, 2t + 1 of each): 4 calls, one per lane (lane t: row
      // half t % 2, tile j + t / 2), and two shuffles give every lane all 4 bytes, byte t's call.
      static_assert(kNT % 2 == 0, "dropout takes the key tiles in pairs");
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int j = 0; j < kNT; j += 2) {
          uint32_t bits = keep8_at(drop, drow + q0 + 16 * mt + 8 * (t & 1), (n0 + 8 * j) / 8 + t / 2) << (8 * t);
          bits |= __shfl_xor_sync(kFull, bits, 1);
          bits |= __shfl_xor_sync(kFull, bits, 2);
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const uint32_t mine = bits >> (8 * (r + 2 * jj) + 2 * t);
              if (!(mine & 1u)) s[mt][j + jj][2 * r] = 0.f;
              if (!(mine & 2u)) s[mt][j + jj][2 * r + 1] = 0.f;
            }
          }
        }
      }
    }

    ptx::cp_async_wait<0>();
    __syncthreads();  // V[j] is in; every warp is done with K[j] (and the key bias of tile j)
    [[maybe_unused]] float next_bias = 0.f;
    if constexpr (kGeneral) {
      k_copy.next();
      if (n0 + kN < seq.Lk) {
        k_copy.copy(sK, seq.Lk - n0 - kN, p.D, true);
        if constexpr (kMask == kAnyMask) {
          if (n0 + 2 * kN <= seq.Lk) {
            m_copy.template copy<false>(n0 + kN, kN);
          } else {
            m_copy.template copy<true>(n0 + kN, seq.Lk - n0 - kN);
          }
        }
      }
      if (tid < kN) next_bias = tile_bias(n0 + kN, tid);
    } else if constexpr (!kLast) {
      // K of the next tile unless that is the last one (copied after the loop, with row checks).
      k_copy.next();
      if (n0 + kN < n_last) {
        k_copy.copy_full(sK, p.D);
        if constexpr (kMask == kAnyMask) m_copy.template copy<false>(n0 + kN, kN);
      }
      if constexpr (kMask == kKeyMask) {
        if (tid < kN && n0 + kN + tid < seq.Lk) {  // (as key_bias)
          const int bytes = p.mask_kind == 2 ? 4 : p.mask_kind == 3 ? 2 : 1;
          const char* mask_at = static_cast<const char*>(p.mask) + (mbase + (n0 + kN + tid) * p.mk) * bytes;
          float m;
          if (p.mask_kind == 1) {
            m = *reinterpret_cast<const uint8_t*>(mask_at) ? 0.f : -INFINITY;
          } else {
            m = p.mask_kind == 2 ? *reinterpret_cast<const float*>(mask_at)
                                 : Half16<T>::to_float(*reinterpret_cast<const uint16_t*>(mask_at));
            m = m > p.mask_lowest ? m * inv_se : -INFINITY;  // NaN masks too
          }
          next_bias = m;
        } else {
          next_bias = -INFINITY;
        }
      }
    }
    ptx::cp_async_commit();

    // O += P V: P's C fragments, packed to 16 bits, are the A operand (no shared-memory trip);
    // ldmatrix.x4.trans gives the V fragments of two n8 (head-dim) tiles per 16 keys.
#pragma unroll
    for (int kk = 0; kk < kNT / 2; ++kk) {
      uint32_t pa[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        pa[mt][0] = Half16<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][1] = Half16<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][2] = Half16<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][3] = Half16<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
      if constexpr (!kDropout) {
        // The row sums of P, as rounded for P V, with one more mma against ones: l_acc[mt][0] and
        // [2] are those of rows g and g + 8 (8 mma per tile instead of 64 FADD).
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) Half16<T>::mma(l_acc[mt], pa[mt], kOnes, kOnes);
      }
#pragma unroll
      for (int dp = 0; dp < kDT / 2; ++dp) {
        uint32_t bv[4];
        ptx::ldmatrix<4, true>(bv, sV + v_off + 16 * kk * LD + 16 * dp);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          Half16<T>::mma(o[mt][2 * dp], pa[mt], bv[0], bv[1]);
          Half16<T>::mma(o[mt][2 * dp + 1], pa[mt], bv[2], bv[3]);
        }
      }
    }
    if constexpr (!kLast || kGeneral) {
      if constexpr (kMask == kKeyMask || kGeneral) {
        if (tid < kN) put_bias(sBias, tid, next_bias);
      }
      ptx::cp_async_wait<0>();
      __syncthreads();  // K[j+1] and its key bias are in; every warp is done with V[j]
    }
  };

  if constexpr (kGeneral) {
    for (int n0 = 0; n0 < seq.Lk; n0 += kN) key_step(n0, std::true_type{});
  } else {
    for (int n0 = 0; n0 < n_last; n0 += kN) key_step(n0, std::false_type{});
    if (n_last > 0) {
      k_copy.copy(sK, seq.Lk - n_last, p.D, true);
      if constexpr (kMask == kAnyMask) m_copy.template copy<true>(n_last, seq.Lk - n_last);
      ptx::cp_async_commit();
      ptx::cp_async_wait<0>();
      __syncthreads();
    }
    key_step(n_last, std::true_type{});
  }

  // Epilogue: 1 / rowsum, stats (the max back in natural units), O through shared memory (the
  // warp's own Q rows: no other warp reads them any more) for 16-byte coalesced stores.
  float row_scale[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = kDropout ? quad_sum(l_run[mt][r]) : l_acc[mt][2 * r];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      row_scale[mt][r] = inv * p.keep_scale;
      const int i = q0 + 16 * mt + 8 * r;
      if (t == 0 && i < seq.Lq) {
        float* st = p.stats + b * p.st_b + h * p.st_h + tok0 + i;
        st[0] = m_run[mt][r] * p.scale_abs;  // the logit's max; -inf for a fully masked row
        st[p.plane] = inv;
      }
    }
  }
  uint16_t* sO = sQ + row0 * LD;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int jd = 0; jd < kDT; ++jd) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float sc = row_scale[mt][r];
        *reinterpret_cast<uint32_t*>(sO + (16 * mt + 8 * r + g) * LD + 8 * jd + 2 * t) =
            Half16<T>::pack(o[mt][jd][2 * r] * sc, o[mt][jd][2 * r + 1] * sc);
      }
    }
  }
  __syncwarp();
  uint16_t* out = static_cast<uint16_t*>(p.o) + b * p.so.b + h * p.so.h + static_cast<int64_t>(tok0 + m0 + row0) * p.so.s;
  const int rows = seq.Lq - m0 - row0 < 16 * kMT ? seq.Lq - m0 - row0 : 16 * kMT;
  if (p.vo) {
#pragma unroll
    for (int c = lane; c < 16 * kMT * kDT; c += 32) {
      const int r = c / kDT, col = (c % kDT) * 8;
      if (r < rows && col < p.D) {
        *reinterpret_cast<uint4*>(out + r * p.so.s + col) = *reinterpret_cast<const uint4*>(sO + r * LD + col);
      }
    }
  } else {
    for (int e = lane; e < 16 * kMT * kD; e += 32) {
      const int r = e / kD, col = e % kD;
      if (r < rows && col < p.D) out[r * p.so.s + col] = sO[r * LD + col];
    }
  }
}

// ------------------------------------------------------------------ backward
// delta = rowsum(dO * O) in fp32, one warp per query row, stored with the row's base-2 log-sum-exp
// as the float2 (-lse2, delta) the gradient kernel reads: lse2 = max * log2 e + log2(sum), +inf for
// a fully masked row (the forward's max -inf, 1 / sum 0), so that its P = 2^(z - lse2) is 0.
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_bwd_delta_kernel(const Params p) {
  const int b = blockIdx.z, h = blockIdx.y, i = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  const Seq seq = seq_of(p, b);
  if (i >= seq.Lq) return;
  const uint16_t* o = static_cast<const uint16_t*>(p.out) + b * p.so.b + h * p.so.h + (seq.tok0 + i) * p.so.s;
  const uint16_t* d = static_cast<const uint16_t*>(p.dout) + b * p.sdo.b + h * p.sdo.h + (seq.tok0 + i) * p.sdo.s;
  float acc = 0.f;
  for (int c = lane; c < p.D; c += 32) {
    acc += Half16<T>::to_float(o[c]) * Half16<T>::to_float(d[c]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(kFull, acc, off);
  if (lane == 0) {
    const int64_t off = b * p.st_b + h * p.st_h + seq.tok0 + i;
    const float mx = p.stats[off], inv = p.stats[p.plane + off];
    const float lse2 = mx == -INFINITY || !(inv > 0.f) ? INFINITY : mx * fwd::kLog2e - log2f(inv);
    reinterpret_cast<float2*>(p.delta)[off] = make_float2(-lse2, acc);
  }
}

// The gradient kernel recomputes P = 2^(z - lse2) from the forward's statistics with z the base-2
// logit in the forward's raw units: S^T = K Q^T starts from the key bias (or the 4-D mask tile) as
// the first mma's C operand, and z - lse2 is one FFMA (S^T * |scale| log2 e - lse2). A scale <= 0
// reaches it as |scale| with q negated (zeros for 0) by the host. Without dropout, dP^T starts
// from -delta as its C operand, so that dS = P * (dP - delta) is one FMUL. No mask and a per-key
// mask share a kernel (the block's key bias, once into shared memory); any 4-D mask is staged per
// query tile (MaskTile) and added as C. Query tiles are copied with cp.async into two buffers: the
// next one streams in while the current one is multiplied. dQ's parts go to a zeroed fp32
// accumulator (rows of kD, query tiles whole), which attention_bwd_dq_kernel turns into dQ.
namespace bwd {
constexpr int kBlock = kRowsPerBlock;  // keys per block (4 warps x 16)
constexpr int tile(int kD) { return kD <= 64 ? 64 : 32; }  // the streamed tile: 64 rows spill above D 64
constexpr int kMaskLd = kBlock + 4;  // the 4-D mask tile's row stride (floats): conflict-free column reads
// K, V; two (Q, dO) tile pairs; dS^T; (-lse2, -delta quads) of two tiles; the key bias; the mask tile.
constexpr int smem_bytes(int kD, int mask) {
  return (2 * kBlock + 4 * tile(kD)) * (kD + kPad) * 2 + kBlock * (tile(kD) + kPad) * 2 + 2 * 3 * tile(kD) * 4 +
         kBlock * 4 + (mask == fwd::kAnyMask ? tile(kD) * kMaskLd * 4 : 0);
}
}  // namespace bwd

// The key bias of key j (key_bias, raw units) with the no-mask case decided at run time.
template <typename T>
__device__ __forceinline__ float key_bias_bwd(const Params& p, int64_t mbase, int j, int Lk) {
  return p.mask == nullptr ? key_bias<T, fwd::kNoMask>(p, mbase, j, Lk, p.inv_scale)
                           : key_bias<T, fwd::kKeyMask>(p, mbase, j, Lk, p.inv_scale);
}

// The block's turn at a query tile's dQ accumulator: the key blocks of one (b, h) add their parts
// in key order (a fixed fp32 summation order, so dQ is deterministic), block kb once *sem == kb.
// One thread waits (acquire); a barrier then releases the block, which reads the accumulator at L2.
// Block kb - 1 of the same (b, h) has a lower linear index, so it was dispatched first and can
// finish (the GPU hands out blocks in index order; FlashAttention-2's deterministic backward relies
// on the same).
__device__ __forceinline__ void wait_turn(const int* sem, int kb) {
#if defined(BERTKERN_EMULATE)
  // Blocks run one after another in grid order (x fastest): the earlier key blocks are done.
  if (ptx::ld_acquire(sem) != kb) emu::set_fault("attention backward: dQ turn taken out of key order");
#else
  while (ptx::ld_acquire(sem) != kb) {
  }
#endif
}

// Adds a staged kM x kD fp32 dQ part (smem, row stride LDQ) to the accumulator's rows at acc: rows
// of kD floats, query tiles whole, so no bounds checks (the padding is never read). The offsets
// are immediates from one address per thread.
template <int kD, int kM, int LDQ, int kI = 0>
__device__ __forceinline__ void add_dq(float4* acc, const float* stage) {
  constexpr int kC = kD / 4;  // float4 chunks per row
  if constexpr (kThreads % kC != 0) {  // (kD = 80: rows of 20 chunks, addresses per chunk)
    for (int c = threadIdx.x; c < kM * kC; c += kThreads) {
      const int r = c / kC, col = (c % kC) * 4;
      float4 v = *reinterpret_cast<const float4*>(stage + r * LDQ + col);
      float4* a = reinterpret_cast<float4*>(reinterpret_cast<float*>(acc) + r * kD + col);
      const float4 prev = ptx::ld_cg(a);
      v.x += prev.x, v.y += prev.y, v.z += prev.z, v.w += prev.w;
      ptx::st_cg(a, v);
    }
  } else if constexpr (kI == 0) {  // the thread's first chunk; the others kThreads chunks apart
    const int r = threadIdx.x / kC, col = threadIdx.x % kC * 4;
    add_dq<kD, kM, LDQ, 1>(reinterpret_cast<float4*>(reinterpret_cast<float*>(acc) + r * kD + col),
                           stage + r * LDQ + col);
  } else if constexpr ((kI - 1) * kThreads < kM * kC) {
    constexpr int c = (kI - 1) * kThreads;
    constexpr int kAt = c / kC * kD * 4 + c % kC * 16;  // bytes from the first chunk
    if (kM * kC % kThreads == 0 || static_cast<int>(threadIdx.x) + c < kM * kC) {
      float4 v = *reinterpret_cast<const float4*>(stage + c / kC * LDQ + c % kC * 4);
      const float4 prev = ptx::ld_cg_at<kAt>(acc);
      v.x += prev.x, v.y += prev.y, v.z += prev.z, v.w += prev.w;
      ptx::st_cg_at<kAt>(acc, v);
    }
    add_dq<kD, kM, LDQ, kI + 1>(acc, stage);
  }
}

// dQ = the accumulator * scale in T: one thread per 4 values of a row.
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(const Params p) {
  constexpr int kC = kD / 4;
  const int b = blockIdx.z, h = blockIdx.y, e = blockIdx.x * kThreads + threadIdx.x, i = e / kC, col = e % kC * 4;
  const Seq seq = seq_of(p, b);
  if (i >= seq.Lq || col >= p.D) return;
  const float4 v = *reinterpret_cast<const float4*>(p.dq_acc + b * p.sacc.b + h * p.sacc.h + i * kD + col);
  uint16_t* o = static_cast<uint16_t*>(p.dq) + b * p.sdq.b + h * p.sdq.h + (seq.tok0 + i) * p.sdq.s + col;
  const float s = p.scale;
  if (p.D % 4 == 0) {  // then every stride of dq is a multiple of 4 too: one 8-byte store
    *reinterpret_cast<uint2*>(o) = make_uint2(Half16<T>::pack(v.x * s, v.y * s), Half16<T>::pack(v.z * s, v.w * s));
  } else {
    const float x[4] = {v.x, v.y, v.z, v.w};
    for (int k = 0; k < 4 && col + k < p.D; ++k) o[k] = Half16<T>::bits(x[k] * s);
  }
}

// acc[jd] += A times B, A = the kK x 16-bit fragments in a (C-layout pairs packed, as mma_pb
// packs them), B = the kK x kD row-major smem tile sb.
template <typename T, int kD, int kK, int LD>
__device__ __forceinline__ void mma_packed_b(float (&acc)[kD / 8][4], const uint32_t (&a)[kK / 16][4],
                                             const uint16_t* sb, int lane) {
  const uint16_t* pv = sb + bt_frag_offset<LD>(lane);
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
#pragma unroll
    for (int dp = 0; dp < kD / 16; ++dp) {
      uint32_t bv[4];
      ptx::ldmatrix<4, true>(bv, pv + 16 * kk * LD + 16 * dp);
      Half16<T>::mma(acc[2 * dp], a[kk], bv[0], bv[1]);
      Half16<T>::mma(acc[2 * dp + 1], a[kk], bv[2], bv[3]);
    }
  }
}

// The backward in FlashAttention-2's five-GEMM form: one block per 64 keys (each warp 16),
// streaming tiles of kM queries. With keys as rows: S^T = K Q^T, dP^T = V dO^T, dV += P^T dO,
// dK += dS^T Q, and the tile's dQ part dS K, which goes through shared memory (dS^T, keys as
// rows) so that each warp takes 16 queries and its share of the head dim over all 64 keys. The
// parts are summed in fp32 in key-block order (wait_turn). No separate dQ pass recomputing S and
// dP. (Launch bounds with min 1 block: without it ptxas capped the former dK/dV kernel at 168
// registers on sm_80 and spilled at D = 32 and 80.)
template <typename T, int kD, int kMask, bool kDropout>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_kernel(const Params p) {
  constexpr int kN = bwd::kBlock, kM = bwd::tile(kD), LD = kD + kPad, LDS = kM + kPad, LDQ = kD + 4, kMT = kM / 8;
  constexpr int LDM = bwd::kMaskLd;
  static_assert(kM * LDQ * 4 <= 2 * kM * LD * 2, "the staged dQ tile fits one Q / dO buffer pair");
  // dQ = dS K: kM / 16 m16 tiles of queries; the warps on one tile split the head dim's 16-wide pairs.
  constexpr int kQTiles = kM / 16, kParts = kWarps / kQTiles, kPairs = kD / 16,
                kPairsPer = (kPairs + kParts - 1) / kParts;
  BERTKERN_DYNAMIC_SMEM(smem);
  uint16_t* sK = reinterpret_cast<uint16_t*>(smem);  // [kN][LD]
  uint16_t* sV = sK + kN * LD;                       // [kN][LD]
  uint16_t* sQ = sV + kN * LD;                       // [2][Q [kM][LD], dO [kM][LD]]
  uint16_t* sDO = sQ + kM * LD;
  uint16_t* sDS = sQ + 4 * kM * LD;  // [kN][LDS]: dS^T of the current tile
  // [2][kM * 3] per tile: -lse2 per query, then the quads (-delta 2c, -delta 2c + 1, same) per query pair
  float* sStat = reinterpret_cast<float*>(sDS + kN * LDS);
  float* sBias = sStat + 2 * 3 * kM;  // [kN]: the keys' bias (raw units)
  float* sMask = sBias + kN;          // [kM][LDM]: any 4-D mask's tile (queries x the block's keys)

  const int b = blockIdx.z, h = blockIdx.y, kb = blockIdx.x, n0 = kb * kN;
  const Seq seq = seq_of(p, b);
  if (n0 >= seq.Lk) return;
  // (from the unsigned thread index: shifts and masks, and ptxas kept them out of local memory)
  const int tid = threadIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = threadIdx.x % 4;
  const int row0 = warp * 16;  // the warp's keys: row0 + g, + 8 of the block
  const bool first = kb == 0, last = n0 + kN >= seq.Lk;  // the first / last key block of the sequence
  const int qt = warp % kQTiles, part = warp / kQTiles;  // the warp's dQ rows 16 qt.. and its part of D

  const int64_t mbase = b * p.mb + h * p.mh;
  Dropout drop{};
  if constexpr (kDropout) drop = make_dropout(p.seed, p.thresh);
  const uint32_t drow = static_cast<uint32_t>((static_cast<int64_t>(b) * p.H + h) * p.row_stride);
  if constexpr (kMask != fwd::kAnyMask) {
    if (tid < kN) sBias[tid] = key_bias_bwd<T>(p, mbase, n0 + tid, seq.Lk);
  }
  // The mask's and row statistics' addresses: from the parameters at each use where that kept ptxas
  // from spilling (kD > 64, and any 4-D mask with dropout at kD 64: 16 bytes on sm_90 otherwise), else
  // held across the loop (where recomputing them spilled).
  constexpr bool kRecompute = kD > 64 || (kD == 64 && kMask == fwd::kAnyMask && kDropout);
  // The 4-D mask: rows = queries, columns = the block's keys (its rows hold them: any_mask_f32).
  auto mask_copy = [&](int m) {
    MaskTile<kM, kN, LDM>{static_cast<const float*>(p.mask) + (kRecompute ? b * p.mb + h * p.mh : mbase) + n0,
                          static_cast<int>(p.mq), m, seq.Lq, sMask}
        .template copy<false>(0, kN);
  };
  // The (-lse2, delta) of query i, (-inf, 0) past Lq (attention_bwd_delta_kernel); into buffer buf.
  const float2* rstat = reinterpret_cast<const float2*>(p.delta) + b * p.st_b + h * p.st_h + seq.tok0;
  auto load_stat = [&](int i) {
    if (i >= seq.Lq) return make_float2(-INFINITY, 0.f);
    return kRecompute ? reinterpret_cast<const float2*>(p.delta)[b * p.st_b + h * p.st_h + seq.tok0 + i] : rstat[i];
  };
  auto put_stat = [&](int buf, int i, float2 v) {
    sStat[buf * 3 * kM + i] = v.x;
    put_bias(reinterpret_cast<float4*>(sStat + buf * 3 * kM + kM), i, -v.y);
  };

  // Prologue: K, V and the first Q / dO tile (and mask tile) in one group, the first tile's statistics.
  TileCopy<kM, kD, LD> q_copy(at_token(p.q, p.sq, b, h, seq.tok0), p.sq.s, p.D),
      do_copy(at_token(p.dout, p.sdo, b, h, seq.tok0), p.sdo.s, p.D);
  TileCopy<kN, kD, LD>(at_token(p.k, p.sk, b, h, seq.tok0 + n0), p.sk.s, p.D).copy(sK, seq.Lk - n0, p.D, true);
  TileCopy<kN, kD, LD>(at_token(p.v, p.sv, b, h, seq.tok0 + n0), p.sv.s, p.D).copy(sV, seq.Lk - n0, p.D, true);
  q_copy.copy(sQ, seq.Lq, p.D, true);
  do_copy.copy(sDO, seq.Lq, p.D, true);
  if constexpr (kMask == fwd::kAnyMask) mask_copy(0);
  ptx::cp_async_commit();
  if (tid < kM) put_stat(0, tid, load_stat(tid));
  ptx::cp_async_wait<0>();
  __syncthreads();

  const float sl2 = p.scale_log2;
  constexpr bool kEarlyStat = !kDropout && (kD <= 64 || kMask != fwd::kAnyMask);  // (see put_stat below)
  const int sem0 = (b * p.H + h) * p.q_tiles;  // this (b, h)'s first query tile in dq_sem
  float dk[kD / 8][4] = {}, dv[kD / 8][4] = {};
  for (int m0 = 0, buf = 0; m0 < seq.Lq; m0 += kM, buf ^= 1) {
    // The next query tile streams into the other buffers while this one is multiplied.
    const bool more = m0 + kM < seq.Lq;
    if (more) {
      q_copy.next();
      do_copy.next();
      q_copy.copy(sQ + (buf ^ 1) * 2 * kM * LD, seq.Lq - m0 - kM, p.D, true);
      do_copy.copy(sDO + (buf ^ 1) * 2 * kM * LD, seq.Lq - m0 - kM, p.D, true);
    }
    ptx::cp_async_commit();
    float2 next_stat = make_float2(0.f, 0.f);
    if (more && tid < kM) next_stat = load_stat(m0 + kM + tid);

    const uint16_t* cQ = sQ + buf * 2 * kM * LD;
    const uint16_t* cDO = sDO + buf * 2 * kM * LD;
    const float* nlse = sStat + buf * 3 * kM;
    const float4* ndelta = reinterpret_cast<const float4*>(nlse + kM);
    // S^T from the keys' bias (rows g, g + 8) or the mask tile; dP^T from -delta without dropout.
    float st[kMT][4], dpt[kMT][4];
    if constexpr (kMask != fwd::kAnyMask) {
      const float b0 = sBias[row0 + g], b1 = sBias[row0 + g + 8];
#pragma unroll
      for (int j = 0; j < kMT; ++j) st[j][0] = st[j][1] = b0, st[j][2] = st[j][3] = b1;
    } else {
#pragma unroll
      for (int j = 0; j < kMT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          st[j][e] = mask_raw(sMask[(8 * j + 2 * t + (e & 1)) * LDM + row0 + g + 8 * (e / 2)], p.inv_scale);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kMT; ++j) {
      if constexpr (kDropout) {
        dpt[j][0] = dpt[j][1] = dpt[j][2] = dpt[j][3] = 0.f;
      } else {
        const float4 d4 = ndelta[4 * j + t];
        dpt[j][0] = d4.x, dpt[j][1] = d4.y, dpt[j][2] = d4.z, dpt[j][3] = d4.w;
      }
    }
    mma_abt<T, kD, kM, LD>(st, sK, row0, cQ, lane);
    mma_abt<T, kD, kM, LD>(dpt, sV, row0, cDO, lane);
    // (the other buffer's statistics were last read before the previous tile's final barrier;
    // stored here, or at the end (kEarlyStat): where ptxas did not spill)
    if (kEarlyStat && more && tid < kM) put_stat(buf ^ 1, tid, next_stat);
    uint32_t pa[kM / 16][4], da[kM / 16][4];  // P^T (after dropout) and dS^T as 16-bit A fragments
    // Dropout: one Philox call gives 8 consecutive keys of a query. The lanes sharing t (g = 0..7)
    // hold keys g and g + 8 of queries 8j + 2t, + 1: 4 calls per query tile, 8 for tiles j, j + 1, one
    // per lane (lane g: query parity g % 2, key half g / 2 % 2, tile j + g / 4). Two shuffles give
    // the 4 lanes of a tile its 4 bytes (byte parity + 2 key half), a third the other tile's; a lane
    // reads bit g of a byte.
    [[maybe_unused]] uint32_t keep_next = 0;
#pragma unroll
    for (int j = 0; j < kMT; ++j) {
      uint32_t keep = 0;
      if constexpr (kDropout) {
        static_assert(kMT % 2 == 0, "dropout takes the query tiles in pairs");
        if (j % 2 == 0) {
          const int x = g % 4;
          const uint32_t c8 = (n0 + row0 + 8 * (x / 2)) / 8;
          keep = keep8_at(drop, drow + m0 + 8 * (j + g / 4) + 2 * t + x % 2, c8) << (8 * x);
          keep |= __shfl_xor_sync(kFull, keep, 4);
          keep |= __shfl_xor_sync(kFull, keep, 8);
          const uint32_t other = __shfl_xor_sync(kFull, keep, 16);
          keep_next = g < 4 ? other : keep;
          keep = g < 4 ? keep : other;
        } else {
          keep = keep_next;
        }
      }
      const float2 nl = *reinterpret_cast<const float2*>(nlse + 8 * j + 2 * t);  // queries 2t, 2t + 1
      float pd[4], ds[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2, x = e & 1;  // key row key0 + 8r, query column 8j + 2t + x
        const float prob = ptx::ex2(fmaf(st[j][e], sl2, x ? nl.y : nl.x));
        if constexpr (kDropout) {
          const float delta = -(x ? ndelta[4 * j + t].y : ndelta[4 * j + t].x);
          const bool kept = (keep >> (8 * (x + 2 * r) + g)) & 1u;
          pd[e] = kept ? prob * p.keep_scale : 0.f;
          ds[e] = prob * ((kept ? dpt[j][e] * p.keep_scale : 0.f) - delta);
        } else {
          pd[e] = prob;
          ds[e] = prob * dpt[j][e];
        }
      }
      pa[j / 2][2 * (j % 2)] = Half16<T>::pack(pd[0], pd[1]);
      pa[j / 2][2 * (j % 2) + 1] = Half16<T>::pack(pd[2], pd[3]);
      da[j / 2][2 * (j % 2)] = Half16<T>::pack(ds[0], ds[1]);
      da[j / 2][2 * (j % 2) + 1] = Half16<T>::pack(ds[2], ds[3]);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        *reinterpret_cast<uint32_t*>(sDS + (row0 + g + 8 * r) * LDS + 8 * j + 2 * t) = da[j / 2][2 * (j % 2) + r];
      }
    }
    mma_packed_b<T, kD, kM, LD>(dv, pa, cDO, lane);
    mma_packed_b<T, kD, kM, LD>(dk, da, cQ, lane);
    __syncthreads();  // dS^T of all 64 keys is in sDS; every warp is done with the mask tile
    if constexpr (kMask == fwd::kAnyMask) {
      if (more) mask_copy(m0 + kM);
      ptx::cp_async_commit();
    }

    // dQ part = dS K: A from dS^T with ldmatrix.trans (matrices of keys x queries), B from K as
    // in P V. The warp's pairs of n8 tiles: part * kPairsPer + i, below kPairs. Staged in fp32
    // through this tile's Q / dO buffers (no warp reads them any more) for coalesced accesses.
    {
      float dq[2 * kPairsPer][4] = {};
      const uint16_t* pa = sDS + b_frag_offset<LDS>(lane) + 16 * qt;
      const uint16_t* pb = sK + bt_frag_offset<LD>(lane) + 16 * part * kPairsPer;
#pragma unroll
      for (int kk = 0; kk < kN / 16; ++kk) {
        uint32_t a[4];
        ptx::ldmatrix<4, true>(a, pa + 16 * kk * LDS);
#pragma unroll
        for (int i = 0; i < kPairsPer; ++i) {
          if (kPairs % kParts != 0 && part * kPairsPer + i >= kPairs) break;
          uint32_t bk[4];
          ptx::ldmatrix<4, true>(bk, pb + 16 * kk * LD + 16 * i);
          Half16<T>::mma(dq[2 * i], a, bk[0], bk[1]);
          Half16<T>::mma(dq[2 * i + 1], a, bk[2], bk[3]);
        }
      }
      float* stage = reinterpret_cast<float*>(sQ + buf * 2 * kM * LD) + (16 * qt + g) * LDQ + 16 * part * kPairsPer;
#pragma unroll
      for (int i2 = 0; i2 < 2 * kPairsPer; ++i2) {
        if (kPairs % kParts != 0 && part * kPairsPer + i2 / 2 >= kPairs) break;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          *reinterpret_cast<float2*>(stage + 8 * r * LDQ + 8 * i2 + 2 * t) = make_float2(dq[i2][2 * r], dq[i2][2 * r + 1]);
        }
      }
    }
    if (!first && tid == 0) wait_turn(p.dq_sem + sem0 + m0 / kM, kb);
    __syncthreads();  // the staged tile is complete, and it is this block's turn
    add_dq<kD, kM, LDQ>(reinterpret_cast<float4*>(p.dq_acc + b * p.sacc.b + h * p.sacc.h + m0 * kD),
                        reinterpret_cast<const float*>(sQ + buf * 2 * kM * LD));

    if (!kEarlyStat && more && tid < kM) put_stat(buf ^ 1, tid, next_stat);
    ptx::cp_async_wait<0>();
    ptx::fence_gpu();  // this block's accumulator writes, before the next block's turn
    __syncthreads();  // the next tile is in; every thread is done with this one
    if (tid == 0 && !last) ptx::st_release(p.dq_sem + sem0 + m0 / kM, kb + 1);
  }

  // dK = |scale| dS^T Q': the kernel's q is sign(scale) q (the host negates or zeroes it).
  const float one[2] = {1.f, 1.f}, scale[2] = {fabsf(p.scale), fabsf(p.scale)};
  store_rows<T, kD>(static_cast<uint16_t*>(p.dv) + b * p.sdv.b + h * p.sdv.h + (seq.tok0 + n0) * p.sdv.s, p.sdv.s,
                    row0, seq.Lk - n0, p.D, dv, one, g, t);
  store_rows<T, kD>(static_cast<uint16_t*>(p.dk) + b * p.sdk.b + h * p.sdk.h + (seq.tok0 + n0) * p.sdk.s, p.sdk.s,
                    row0, seq.Lk - n0, p.D, dk, scale, g, t);
}

// ------------------------------------------------------------------ host: plans
// From the argument checks to each kernel's grid: FwdPlan / BwdPlan hold the parameters and the
// outputs, dispatch_* name each kernel with its grid and shared memory.
// The padded head dim a kernel is compiled for: the smallest of 32, 64, 80, 128 holding D.
template <typename F>
void with_head_dim(int D, F&& f) {
  if (D <= 32) {
    f(std::integral_constant<int, 32>{});
  } else if (D <= 64) {
    f(std::integral_constant<int, 64>{});
  } else if (D <= 80) {
    f(std::integral_constant<int, 80>{});
  } else {
    f(std::integral_constant<int, 128>{});
  }
}

// The forward's compile-time mask kind (fwd::Mask) and dropout flag.
template <typename F>
void with_mask_kind(int kind, F&& f) {
  if (kind == fwd::kNoMask) {
    f(std::integral_constant<int, fwd::kNoMask>{});
  } else if (kind == fwd::kKeyMask) {
    f(std::integral_constant<int, fwd::kKeyMask>{});
  } else {
    f(std::integral_constant<int, fwd::kAnyMask>{});
  }
}

template <typename F>
void with_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename F>
void with_type(at::ScalarType t, F&& f) {
  if (t == at::kHalf) {
    f(__half{});
  } else {
    f(__nv_bfloat16{});
  }
}

constexpr const char* kFwd = "bertkern_cuda::attention_fwd";
constexpr const char* kBwd = "bertkern_cuda::attention_bwd";
constexpr const char* kFwdSchema =
    "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? cu_seqlens, int max_seqlen, float scale, "
    "float dropout_p, Tensor? seed) -> (Tensor, Tensor)";
constexpr const char* kBwdSchema =
    "attention_bwd(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? cu_seqlens, int max_seqlen, "
    "Tensor out, Tensor stats, float scale, float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor)";

bool vec_ok(const at::Tensor& t, const Strides& s, int D) {
  return D % 8 == 0 && s.b % 8 == 0 && s.h % 8 == 0 && s.s % 8 == 0 && is_aligned(t.const_data_ptr(), 16);
}

// (batch, head, token) strides of a [B, H, S, D] (padded) or [total, H, D] (varlen) tensor.
Strides strides_of(const at::Tensor& t, bool varlen) {
  if (varlen) return {0, t.stride(1), t.stride(0)};
  return {t.stride(0), t.stride(1), t.stride(2)};
}

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool varlen) {
  BK_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": q must be float16 or bfloat16 (the CUDA attention kernels use fp16/bf16 tensor cores), got ",
              q.scalar_type(), "; use backend='triton' for float32");
  const int dims = varlen ? 3 : 4;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}, {"v", v}}) {
    BK_CHECK(t.dim() == dims, op, ": ", name, " must be ", dims, "-D (", varlen ? "[total, H, D]" : "[B, H, S, D]",
                "), got shape ", shape_str(t.sizes()));
    BK_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but q has ",
                q.scalar_type());
    BK_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device());
    BK_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name, " must have unit stride along D, got strides ",
                shape_str(t.strides()));
  }
  const int64_t D = q.size(-1);
  BK_CHECK(D >= 1 && D <= kMaxHeadDim, op, ": head dim ", D, " is outside the CUDA kernels' range [1, ",
              kMaxHeadDim, "]; use backend='triton'");
  if (varlen) {
    BK_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op, ": q, k, v must have the same shape, got ",
                shape_str(q.sizes()), ", ", shape_str(k.sizes()), ", ", shape_str(v.sizes()));
    BK_CHECK(q.size(0) <= std::numeric_limits<int>::max(), op, ": total tokens must fit in int32");
  } else {
    BK_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == D, op,
                ": k must be [B, H, S_k, D] with q's B, H, D, got ", shape_str(k.sizes()), " for q ",
                shape_str(q.sizes()));
    BK_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", shape_str(k.sizes()), ", got ",
                shape_str(v.sizes()));
    BK_CHECK(q.size(2) <= std::numeric_limits<int>::max() && k.size(2) <= std::numeric_limits<int>::max(), op,
                ": sequence lengths must fit in int32");
  }
}

// The shape, input, mask, varlen and dropout fields shared by forward and backward.
Params common_params(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_seqlens,
                     int64_t max_seqlen, double scale, double dropout_p, const at::Tensor& seed, int64_t& B) {
  const bool varlen = cu_seqlens.has_value() && cu_seqlens->defined();
  Params p{};
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.sq = strides_of(q, varlen);
  p.sk = strides_of(k, varlen);
  p.sv = strides_of(v, varlen);
  p.D = static_cast<int>(q.size(-1));
  p.vq = vec_ok(q, p.sq, p.D);
  p.vk = vec_ok(k, p.sk, p.D);
  p.vv = vec_ok(v, p.sv, p.D);
  if (varlen) {
    const at::Tensor& cu = *cu_seqlens;
    BK_CHECK(!(mask.has_value() && mask->defined()), op, ": varlen attention takes no mask");
    BK_CHECK(cu.dim() == 1 && cu.numel() >= 1 && (cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong),
                op, ": cu_seqlens must be a 1-D int32 or int64 tensor [B + 1], got ", cu.scalar_type(), " of shape ",
                shape_str(cu.sizes()));
    BK_CHECK(cu.device() == q.device(), op, ": cu_seqlens is on ", cu.device(), " but q is on ", q.device());
    BK_CHECK(cu.is_contiguous(), op, ": cu_seqlens must be contiguous");
    BK_CHECK(max_seqlen >= 0 && max_seqlen <= std::numeric_limits<int>::max(), op,
                ": max_seqlen must be in [0, 2^31), got ", max_seqlen);
    B = cu.numel() - 1;
    p.cu = cu.const_data_ptr();
    p.cu64 = cu.scalar_type() == at::kLong;
    p.H = static_cast<int>(q.size(1));
    p.S_q = p.S_k = static_cast<int>(max_seqlen);
  } else {
    B = q.size(0);
    p.H = static_cast<int>(q.size(1));
    p.S_q = static_cast<int>(q.size(2));
    p.S_k = static_cast<int>(k.size(2));
  }
  BK_CHECK(B <= 65535 && p.H <= 65535, op, ": the batch and head counts must be at most 65535 (grid limits), got ",
              B, " and ", p.H);
  p.row_stride = p.S_q;
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    BK_CHECK(m.device() == q.device(), op, ": mask is on ", m.device(), " but q is on ", q.device());
    BK_CHECK(m.dim() == 4 && m.size(0) == B && m.size(1) == p.H && m.size(2) == p.S_q && m.size(3) == p.S_k, op,
                ": mask must be a [B, H, S_q, S_k] view (expand a broadcast mask first), got ",
                shape_str(m.sizes()));
    const auto mt = m.scalar_type();
    BK_CHECK(mt == at::kBool || mt == at::kFloat || mt == q.scalar_type(), op,
                ": mask must be bool, float32 or q's dtype, got ", mt);
    p.mask = m.const_data_ptr();
    p.mask_kind = mt == at::kBool ? 1 : mt == at::kFloat ? 2 : 3;
    p.mb = m.stride(0);
    p.mh = m.stride(1);
    p.mq = m.stride(2);
    p.mk = m.stride(3);
    p.mask_lowest = mt == at::kFloat  ? std::numeric_limits<float>::lowest()
                    : mt == at::kHalf ? -65504.0f
                                      : static_cast<float>(std::numeric_limits<c10::BFloat16>::lowest());
  }
  p.scale = static_cast<float>(scale);
  p.scale_abs = p.scale > 0.f ? p.scale : p.scale < 0.f ? -p.scale : 1.f;
  p.scale_log2 = p.scale_abs * fwd::kLog2e;
  p.inv_scale = 1.f / p.scale_abs;
  p.seed = seed.defined() ? seed.const_data_ptr<int64_t>() : nullptr;
  p.thresh = dropout_threshold(dropout_p);
  p.keep_scale = seed.defined() ? static_cast<float>(dropout_scale(dropout_p)) : 1.0f;
  return p;
}

// Points p's statistics fields at stats ([2, B, H, S_q] padded, [2, H, total] varlen).
void set_stats(Params& p, const at::Tensor& stats, bool varlen) {
  p.stats = const_cast<float*>(stats.const_data_ptr<float>());
  p.plane = stats.stride(0);
  p.st_b = varlen ? 0 : stats.stride(1);
  p.st_h = stats.stride(varlen ? 1 : 2);
}

at::Tensor bshd_empty(int64_t B, int64_t S, int64_t H, int64_t D, const at::TensorOptions& opts) {
  return at::empty({B, S, H, D}, opts).transpose(1, 2);
}

// A mask that varies only along keys (the [B, 1, 1, S_k] padding mask, expanded) is read once per
// key tile into shared memory by the key-mask kernels; any other mask element by element (fwd::Mask).
int mask_kind(const Params& p) {
  if (p.mask_kind == 0) return fwd::kNoMask;
  const bool per_key = (p.mh == 0 || p.H == 1) && (p.mq == 0 || p.S_q == 1);
  return per_key ? fwd::kKeyMask : fwd::kAnyMask;
}

// Points an any-mask kernel (kAnyMask) at the fp32 mask it reads (MaskTile): the mask itself when it
// is fp32 with unit key stride, rows 16-byte aligned and readable up to S_k rounded up to 64 (the
// backward copies whole 64-key tiles), and -FLT_MAX * inv_scale overflows to -inf (mask_raw's
// masked values); else a copy of its own elements (broadcast dims stay stride 0, nothing is
// materialised over them): -inf where masked (false, <= lowest, NaN), the value as fp32 elsewhere,
// rows padded with -inf to a multiple of 64. Returns the copy (kept alive by the plan), or an
// undefined tensor.
at::Tensor any_mask_f32(Params& p, const std::optional<at::Tensor>& mask) {
  if (mask_kind(p) != fwd::kAnyMask) return {};
  const at::Tensor& m = *mask;
  const volatile float lowest_raw = -FLT_MAX * p.inv_scale;
  const bool direct = m.scalar_type() == at::kFloat && m.stride(3) == 1 && p.S_k % 64 == 0 && p.mb % 4 == 0 &&
                      p.mh % 4 == 0 && p.mq % 4 == 0 && is_aligned(m.const_data_ptr(), 16) && std::isinf(lowest_raw) &&
                      p.S_q * p.mq <= std::numeric_limits<int>::max();
  at::Tensor copy;
  if (!direct) {
    at::Tensor u = m;  // the mask's own elements: broadcast dims (stride 0) narrowed to one
    for (int d = 0; d < 3; ++d) {
      if (u.stride(d) == 0 && u.size(d) > 1) u = u.narrow(d, 0, 1);
    }
    const int64_t S_k = m.size(3), S_k64 = ceil_div<int64_t>(S_k, 64) * 64;
    BK_CHECK(p.S_q * S_k64 <= std::numeric_limits<int>::max(), "attention: a 4-D mask of more than 2^31 elements per ",
             "(batch, head) plane");
    // (-inf past S_k: the backward's P of those keys is 0, never 2^(-lse) of a row whose logits are
    // all very negative, which overflows)
    at::Tensor f = at::full({u.size(0), u.size(1), u.size(2), S_k64}, -INFINITY, m.options().dtype(at::kFloat))
                       .narrow(3, 0, S_k);
    if (m.scalar_type() == at::kBool) {
      f.zero_().masked_fill_(u.logical_not(), -INFINITY);
    } else {
      f.copy_(u).masked_fill_(u.gt(p.mask_lowest).logical_not(), -INFINITY);  // NaN compares false
    }
    copy = f.expand(m.sizes());
    p.mask = copy.const_data_ptr();
    p.mb = copy.stride(0);
    p.mh = copy.stride(1);
    p.mq = copy.stride(2);
    p.mk = copy.stride(3);
  }
  p.mask_kind = 2;
  p.mask_lowest = std::numeric_limits<float>::lowest();
  return copy;
}

struct FwdPlan {
  Params p;
  int64_t B;
  int mask;  // fwd::Mask
  at::Tensor out, stats;
  at::Tensor padded[3];  // q, k, v copies the forward reads instead (see plan_fwd)
  at::Tensor mask_f32;   // any_mask_f32's copy
};

FwdPlan plan_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                 const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, double scale, double dropout_p,
                 const std::optional<at::Tensor>& seed_opt) {
  const bool varlen = cu_seqlens.has_value() && cu_seqlens->defined();
  check_qkv(kFwd, q, k, v, varlen);
  const at::Tensor seed = checked_seed(kFwd, seed_opt, dropout_p, q);
  FwdPlan plan;
  plan.p = common_params(kFwd, q, k, v, mask, cu_seqlens, max_seqlen, scale, dropout_p, seed, plan.B);
  Params& p = plan.p;
  const int64_t H = p.H, D = p.D;
  if (varlen) {
    plan.out = at::empty({q.size(0), H, D}, q.options());
    plan.stats = at::empty({2, H, q.size(0)}, q.options().dtype(at::kFloat));
  } else {
    plan.out = bshd_empty(plan.B, p.S_q, H, D, q.options());
    plan.stats = at::empty({2, plan.B, H, p.S_q}, q.options().dtype(at::kFloat));
  }
  set_stats(p, plan.stats, varlen);
  p.o = plan.out.data_ptr();
  p.so = strides_of(plan.out, varlen);
  p.vo = vec_ok(plan.out, p.so, p.D);
  plan.mask = mask_kind(p);
  plan.mask_f32 = any_mask_f32(p, mask);
  // The forward kernel copies Q, K, V in 16-byte chunks only (no element path in its key loop):
  // an input that does not allow them (D % 8 != 0, a stride or address not a multiple of 8
  // elements / 16 bytes) is read from a contiguous copy, zero-padded to D rounded up to 8.
  const int64_t D8 = ceil_div<int64_t>(D, 8) * 8;
  const at::Tensor* in[3] = {&q, &k, &v};
  const void** ptrs[3] = {&p.q, &p.k, &p.v};
  Strides* strides[3] = {&p.sq, &p.sk, &p.sv};
  bool* vec[3] = {&p.vq, &p.vk, &p.vv};
  for (int i = 0; i < 3; ++i) {
    if (*vec[i] || in[i]->numel() == 0) continue;
    plan.padded[i] = at::constant_pad_nd(*in[i], {0, D8 - D}).contiguous();
    *ptrs[i] = plan.padded[i].const_data_ptr();
    *strides[i] = strides_of(plan.padded[i], varlen);
    *vec[i] = true;
  }
  return plan;
}

// Calls launch(kernel, grid, shared-memory bytes) for each kernel of the forward, in order.
template <typename Launch>
void dispatch_fwd(const FwdPlan& plan, Launch&& launch) {
  const Params& p = plan.p;
  if (plan.out.numel() == 0 || plan.B == 0 || p.S_q == 0) return;
  const dim3 grid(ceil_div(p.S_q, fwd::kM), p.H, static_cast<unsigned>(plan.B));
  with_type(plan.out.scalar_type(), [&](auto type) {
    using T = decltype(type);
    with_head_dim(p.D, [&](auto hd) {
      with_mask_kind(plan.mask, [&](auto mk) {
        with_bool(p.seed != nullptr, [&](auto dropout) {
          constexpr int kD = decltype(hd)::value;
          launch(attention_fwd_kernel<T, kD, decltype(mk)::value, decltype(dropout)::value>, grid,
                 fwd::smem_bytes(kD, decltype(dropout)::value, decltype(mk)::value));
        });
      });
    });
  });
}

struct BwdPlan {
  Params p;
  int64_t B;
  at::Tensor dq, dk, dv, delta, stats;
  at::Tensor dq_acc, dq_sem;  // the ordered dQ accumulation (dq_sem: more than one key block only)
  at::Tensor padded[4];       // q, k, v, grad copies the gradient kernel reads instead (see plan_bwd)
  at::Tensor mask_f32;        // any_mask_f32's copy
};

BwdPlan plan_bwd(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_seqlens,
                 int64_t max_seqlen, const at::Tensor& out, const at::Tensor& stats_in, double scale,
                 double dropout_p, const std::optional<at::Tensor>& seed_opt) {
  const bool varlen = cu_seqlens.has_value() && cu_seqlens->defined();
  check_qkv(kBwd, q, k, v, varlen);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad", grad}, {"out", out}}) {
    BK_CHECK(t.sizes() == q.sizes(), kBwd, ": ", name, " must have q's shape ", shape_str(q.sizes()), ", got ",
                shape_str(t.sizes()));
    BK_CHECK(t.scalar_type() == q.scalar_type(), kBwd, ": ", name, " has dtype ", t.scalar_type(),
                " but q has ", q.scalar_type());
    BK_CHECK(t.device() == q.device(), kBwd, ": ", name, " is on ", t.device(), " but q is on ", q.device());
    BK_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, kBwd, ": ", name, " must have unit stride along D");
  }
  const at::Tensor seed = checked_seed(kBwd, seed_opt, dropout_p, q);
  BwdPlan plan;
  plan.p = common_params(kBwd, q, k, v, mask, cu_seqlens, max_seqlen, scale, dropout_p, seed, plan.B);
  Params& p = plan.p;
  const int64_t H = p.H, D = p.D, total = varlen ? q.size(0) : 0;
  const std::vector<int64_t> stats_shape =
      varlen ? std::vector<int64_t>{2, H, total} : std::vector<int64_t>{2, plan.B, H, p.S_q};
  BK_CHECK(stats_in.scalar_type() == at::kFloat && stats_in.sizes() == at::IntArrayRef(stats_shape), kBwd,
              ": stats must be the forward's float32 ", shape_str(stats_shape), ", got ", stats_in.scalar_type(),
              " ", shape_str(stats_in.sizes()));
  BK_CHECK(stats_in.device() == q.device(), kBwd, ": stats is on ", stats_in.device(), " but q is on ", q.device());
  plan.stats = stats_in.contiguous();
  set_stats(p, plan.stats, varlen);
  if (varlen) {
    plan.dq = at::empty({total, H, D}, q.options());
    plan.dk = at::empty({total, H, D}, q.options());
    plan.dv = at::empty({total, H, D}, q.options());
    plan.delta = at::empty({H, total, 2}, q.options().dtype(at::kFloat));
  } else {
    plan.dq = bshd_empty(plan.B, p.S_q, H, D, q.options());
    plan.dk = bshd_empty(plan.B, p.S_k, H, D, q.options());
    plan.dv = bshd_empty(plan.B, p.S_k, H, D, q.options());
    plan.delta = at::empty({plan.B, H, p.S_q, 2}, q.options().dtype(at::kFloat));
  }
  p.delta = plan.delta.data_ptr<float>();  // (-lse2, delta) pairs, laid out like one plane of stats
  p.out = out.const_data_ptr();
  p.dout = grad.const_data_ptr();
  p.so = strides_of(out, varlen);
  p.sdo = strides_of(grad, varlen);
  p.vdo = vec_ok(grad, p.sdo, p.D);
  // The gradient kernel copies Q, dO, K, V in 16-byte chunks only (as the forward; plan_fwd), from
  // zero-padded copies where needed, and takes q as sign(scale) q (zeros for a scale of 0) with
  // |scale| (its logits in raw units need a positive scale; dK is |scale| dS^T sign(scale) q).
  {
    const int64_t D8 = ceil_div<int64_t>(D, 8) * 8;
    const at::Tensor* in[4] = {&q, &k, &v, &grad};
    const void** ptrs[4] = {&p.q, &p.k, &p.v, &p.dout};
    Strides* strides[4] = {&p.sq, &p.sk, &p.sv, &p.sdo};
    bool* vec[4] = {&p.vq, &p.vk, &p.vv, &p.vdo};
    for (int i = 0; i < 4; ++i) {
      const bool flip = i == 0 && !(p.scale > 0.f);
      if ((*vec[i] && !flip) || in[i]->numel() == 0) continue;
      plan.padded[i] = at::constant_pad_nd(*in[i], {0, D8 - D}).contiguous();
      if (flip) plan.padded[i] = p.scale < 0.f ? plan.padded[i].neg() : plan.padded[i].mul(0);  // (not in place)
      *ptrs[i] = plan.padded[i].const_data_ptr();
      *strides[i] = strides_of(plan.padded[i], varlen);
      *vec[i] = true;
    }
  }
  plan.mask_f32 = any_mask_f32(p, mask);
  p.dq = plan.dq.data_ptr();
  p.dk = plan.dk.data_ptr();
  p.dv = plan.dv.data_ptr();
  p.sdq = strides_of(plan.dq, varlen);
  p.sdk = strides_of(plan.dk, varlen);
  p.sdv = strides_of(plan.dv, varlen);
  if (plan.B == 0 || q.numel() == 0 || p.S_q == 0) {  // keys no query reads get zero gradients
    plan.dk.zero_();
    plan.dv.zero_();
  }
  if (p.S_k == 0) plan.dq.zero_();  // queries with no key (no key block runs)
  // The key blocks sum their dQ parts in a zeroed fp32 accumulator, in key-block order (see
  // attention_bwd_kernel): [B, H, query tiles x tile rows, kD] (whole tiles and rows of the padded
  // head dim: no bounds checks), turned into dQ by attention_bwd_dq_kernel.
  int kD = 0;
  with_head_dim(p.D, [&](auto hd) { kD = decltype(hd)::value; });
  const int tile = bwd::tile(kD);
  p.q_tiles = static_cast<int>(ceil_div<int64_t>(p.S_q, tile));
  if (p.S_k > 0 && plan.dq.numel() > 0) {
    const int64_t Sp = static_cast<int64_t>(p.q_tiles) * tile;
    plan.dq_acc = at::zeros({plan.B * H * Sp * kD}, q.options().dtype(at::kFloat));
    p.dq_acc = plan.dq_acc.data_ptr<float>();
    p.sacc = Strides{H * Sp * kD, Sp * kD, kD};
    if (p.S_k > bwd::kBlock) {
      plan.dq_sem = at::empty({plan.B * H * p.q_tiles}, q.options().dtype(at::kInt)).zero_();
      p.dq_sem = plan.dq_sem.data_ptr<int>();
    }
  }
  return plan;
}

// delta, then dK, dV and dQ's accumulator (reading delta), then dQ.
template <typename Launch>
void dispatch_bwd(const BwdPlan& plan, Launch&& launch) {
  const Params& p = plan.p;
  if (plan.B == 0 || plan.dq.numel() == 0 || p.S_q == 0) return;
  const unsigned B = static_cast<unsigned>(plan.B);
  with_type(plan.dq.scalar_type(), [&](auto type) {
    using T = decltype(type);
    launch(attention_bwd_delta_kernel<T>, dim3(ceil_div(p.S_q, kWarps), p.H, B), 0);
    with_head_dim(p.D, [&](auto hd) {
      constexpr int kD = decltype(hd)::value;
      // No mask and a per-key mask share the key-mask kernels (see bwd).
      with_bool(mask_kind(p) == fwd::kAnyMask, [&](auto any) {
        with_bool(p.seed != nullptr, [&](auto dropout) {
          constexpr int kMask = decltype(any)::value ? fwd::kAnyMask : fwd::kKeyMask;
          constexpr bool kDrop = decltype(dropout)::value;
          if (p.S_k > 0) {
            launch(attention_bwd_kernel<T, kD, kMask, kDrop>, dim3(ceil_div(p.S_k, bwd::kBlock), p.H, B),
                   bwd::smem_bytes(kD, kMask));
          }
        });
      });
      if (p.S_k > 0) launch(attention_bwd_dq_kernel<T, kD>, dim3(ceil_div(p.S_q * (kD / 4), kThreads), p.H, B), 0);
    });
  });
}

// ------------------------------------------------------------------ ops
void check_device(const char* op, const at::Tensor& q) {
  BK_CHECK(is_device_tensor(q), op, ": q must be a CUDA tensor, got ", q.device());
  const int major = cc_major(q.device().index());
  BK_CHECK(major >= 8, op, ": the CUDA attention kernels need sm_80 or newer (tensor-core mma.sync), ",
              "got compute capability ", major, ".x; use backend='triton'");
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& mask,
                                                 const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                                 double scale, double dropout_p,
                                                 const std::optional<at::Tensor>& seed) {
  check_device(kFwd, q);
  const DeviceScope scope(q);
  const FwdPlan plan = plan_fwd(q, k, v, mask, cu_seqlens, max_seqlen, scale, dropout_p, seed);
  dispatch_fwd(plan, [&](auto kernel, dim3 grid, int smem) {
    launch(kernel, grid, kThreads, smem, scope.stream(), plan.p);
  });
  return {plan.out, plan.stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
    const at::Tensor& out, const at::Tensor& stats, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  check_device(kBwd, q);
  const DeviceScope scope(q);
  const BwdPlan plan = plan_bwd(grad, q, k, v, mask, cu_seqlens, max_seqlen, out, stats, scale, dropout_p, seed);
  dispatch_bwd(plan, [&](auto kernel, dim3 grid, int smem) {
    launch(kernel, grid, kThreads, smem, scope.stream(), plan.p);
  });
  return {plan.dq, plan.dk, plan.dv};
}

}  // namespace attn
}  // namespace bertkern

TORCH_LIBRARY_FRAGMENT(BERTKERN_OPS, m) {
  m.def(bertkern::attn::kFwdSchema);
  m.def(bertkern::attn::kBwdSchema);
}

TORCH_LIBRARY_IMPL(BERTKERN_OPS, BERTKERN_DEVICE, m) {
  m.impl("attention_fwd", &bertkern::attn::attention_fwd);
  m.impl("attention_bwd", &bertkern::attn::attention_bwd);
}
