// masked_softmax: y = dropout(softmax(x * scale + mask)) over the last dim, and its backward
// dx = scale * p * (dp - sum(dp * p)), dp = dropout's backward of dy. CUDA kernels for bertkern.
//
//   bertkern_cuda::masked_softmax_fwd(Tensor scores, Tensor? mask, float scale, float dropout_p,
//                                     Tensor? seed) -> (Tensor out, Tensor probs)
//   bertkern_cuda::masked_softmax_bwd(Tensor grad, Tensor probs, float scale, float dropout_p,
//                                     Tensor? seed) -> Tensor
//
// fwd: scores is 4-D [B, H, Q, N] with unit stride along N (any other strides); mask is None or a
// 4-D tensor of scores' shape read through its own strides, so an expanded [B, 1, 1, N] mask (stride
// 0 over H and Q) is never materialised. Mask dtypes: bool (true = keep), the scores' dtype or
// float32 (additive; kept where mask > lowest(mask dtype), so -inf and finfo.min mask the key).
// Masked keys become -inf by selection, never by addition: NaN/inf under the mask cannot leak. A row
// with every key masked is all zeros. out is [B, H, Q, N] contiguous; probs is the softmax before
// dropout (the backward needs it) when dropout_p > 0, else an empty tensor.
// bwd: grad and probs are 2-D [rows, N] with unit stride along N; returns dx [rows, N] contiguous.
//
// Dropout: the Philox scheme of philox.cuh on the [rows, N] view (element (row, col)); it is
// bertkern.reference.dropout_keep_mask bit for bit, so the backward regenerates the forward's mask
// and all backends agree.
//
// Kernels: rows of up to 1024 keys are held in registers by one warp (several rows per warp for
// short rows: 1..32 lanes per row), with 16-byte vector loads/stores when every row is 16-byte
// aligned (N a multiple of 8 for 16-bit, 4 for fp32) and element-wise accesses otherwise; longer
// rows (and float64) take one block per row: an online max/sum pass, then a normalising pass.
// Math in fp32 (fp64 for fp64), int64 offsets.

#include "common.cuh"
#include "philox.cuh"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

namespace {

constexpr int kWarp = 32;
constexpr int kWarpBlock = 128;     // threads per block of the warp-per-row kernels
constexpr int kWarpMaxN = 1024;     // longest row the warp kernels hold (32 lanes x 32 registers)
constexpr int kRowBlockMax = 512;   // threads per block of the block-per-row kernels
constexpr int64_t kMaxLaunchRows = (int64_t{1} << 31) - 1;  // rows of one forward launch: 32-bit row math
constexpr unsigned kFull = 0xffffffffu;

using bertkern::acc_t;
using bertkern::DeviceScope;
using bertkern::Dropout;
using bertkern::is_device_tensor;
using bertkern::is_kernel_dtype;
using bertkern::keep_bits;
using bertkern::launch;
using bertkern::make_dropout;
using bertkern::load_vec;
using bertkern::shape_str;
using bertkern::store_vec;
using bertkern::Vec;

__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// ------------------------------------------------------------------ dropout
struct DropoutArgs {
  const int64_t* seed;   // one int64 on the device; nullptr: dropout off
  uint32_t threshold;    // keep iff the 16-bit draw >= threshold; 2^16 drops everything
  double keep_scale;     // 1 / (1 - p), 0 when p == 1
  float keep_scale_f;    // the same as a float (a conversion in the kernel is code ptxas may sink into a loop)
  bool enabled;
};

template <typename A>
__device__ __forceinline__ A keep_scale_of(const DropoutArgs& d) {
  if constexpr (std::is_same_v<A, double>) {
    return d.keep_scale;
  } else {
    return d.keep_scale_f;
  }
}

// Keep flags of columns col0 .. col0 + V - 1 of `row` (col0 % V == 0): keep_bits' Philox calls.
template <int V>
__device__ __forceinline__ void keep_flags(bool (&keep)[V], int64_t row, int col0, const Dropout& d) {
  static_assert(V % 8 == 0 || V == 4, "keep_bits shares a Philox call over 8 columns or half of them");
  const uint32_t bits = keep_bits<V>(d, row, col0);
#pragma unroll
  for (int j = 0; j < V; ++j) keep[j] = (bits >> j) & 1u;
}

// ------------------------------------------------------------------ masks
struct NoMask {};
struct BoolMask {};  // torch.bool storage: one byte, 0 or 1

// keep(raw, add, lowest): whether a key is attended, and what is added to its logit; read: one
// element at an offset. Storage is what the mask holds per key (the vector path loads it in packs).
template <typename M, typename A>
struct MaskRead {  // additive float mask of type M
  using Storage = M;
  static __device__ __forceinline__ bool keep(M raw, A& add, A lowest) {
    add = static_cast<A>(raw);
    return add > lowest;  // false for NaN too
  }
  static __device__ __forceinline__ bool read(const void* m, int64_t off, A& add, A lowest) {
    return keep(static_cast<const M*>(m)[off], add, lowest);
  }
};
template <typename A>
struct MaskRead<NoMask, A> {
  using Storage = uint8_t;  // never loaded
  static __device__ __forceinline__ bool read(const void*, int64_t, A& add, A) {
    add = A(0);
    return true;
  }
};
template <typename A>
struct MaskRead<BoolMask, A> {
  using Storage = uint8_t;
  static __device__ __forceinline__ bool keep(uint8_t raw, A& add, A) {
    add = A(0);
    return raw != 0;
  }
  static __device__ __forceinline__ bool read(const void* m, int64_t off, A& add, A lowest) {
    return keep(static_cast<const uint8_t*>(m)[off], add, lowest);
  }
};

// n / d and n % d for 0 <= n < 2^31 and 1 <= d < 2^31 by a multiply-high and a shift (Granlund and
// Montgomery; PyTorch's IntDivider): magic m = floor(2^32 (2^s - d) / d) + 1, 2^s >= d, from the host.
struct Div32 {
  uint32_t d, m, s;
  Div32() = default;
  explicit Div32(uint32_t div) : d(div), s(0) {
    while ((uint64_t{1} << s) < d) ++s;
    m = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << s) - d)) / d + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const {
    return (static_cast<uint32_t>((static_cast<uint64_t>(n) * m) >> 32) + n) >> s;
  }
};

struct FwdArgs {
  const void* x;     // these pointers at this launch's first row (batch entry)
  const void* mask;
  void* y;
  void* probs;
  int64_t rows, row0;  // this launch's rows (< 2^31), and the first one's index in the whole tensor
  Div32 div_q, div_h;  // by Q and H
  int N;
  int64_t xs_b, xs_h, xs_q;
  int64_t ms_b, ms_h, ms_q, ms_k;
  double scale;
  double mask_lowest;
  DropoutArgs drop;
};

struct BwdArgs {
  const void* grad;
  const void* probs;
  void* dx;
  int64_t rows;
  int N;
  int64_t gs, ps;  // row strides
  double scale;
  DropoutArgs drop;
};

// Offsets of a row of this launch (< 2^31: 32-bit math) in the scores and the mask.
__device__ __forceinline__ void row_offsets(const FwdArgs& a, int64_t row, int64_t& x_off, int64_t& m_off) {
  const uint32_t r = static_cast<uint32_t>(row);
  const uint32_t bh = a.div_q.div(r), b = a.div_h.div(bh);
  const uint32_t q = r - bh * a.div_q.d, h = bh - b * a.div_h.d;
  x_off = static_cast<int64_t>(b) * a.xs_b + static_cast<int64_t>(h) * a.xs_h + static_cast<int64_t>(q) * a.xs_q;
  m_off = static_cast<int64_t>(b) * a.ms_b + static_cast<int64_t>(h) * a.ms_h + static_cast<int64_t>(q) * a.ms_q;
}

template <typename T, typename M, typename A>
__device__ __forceinline__ A logit(const FwdArgs& a, T x, int64_t m_off, int col, A scale, A lowest) {
  A add;
  const bool keep = MaskRead<M, A>::read(a.mask, m_off + static_cast<int64_t>(col) * a.ms_k, add, lowest);
  return keep ? static_cast<A>(x) * scale + add : A(-INFINITY);
}

// ------------------------------------------------------------------ warp-per-row kernels
// A group of `lanes` = 2^log2_lanes lanes owns one row; lane `sub` of the group holds the VEC
// consecutive columns starting at (c * lanes + sub) * VEC, for c < ELTS / VEC (capacity lanes * ELTS
// >= N). ALIGNED: the host checked N % VEC == 0 and 16-byte alignment of every row, and a pack moves
// as one 16-byte load/store (VEC = 16 / sizeof(T)). Otherwise VEC = 4 and elements move one by one
// with per-element bounds. Either way VEC is 8 or 4: one Philox call or half of one (keep_bits).
template <typename T, bool ALIGNED>
struct WarpVec {
  static constexpr int value = ALIGNED ? 16 / static_cast<int>(sizeof(T)) : 4;
};

template <typename T, int VEC, bool ALIGNED>
__device__ __forceinline__ Vec<T, VEC> load_pack(const T* p, int col0, int N) {
  if constexpr (ALIGNED) {
    return load_vec<T, VEC>(p + col0);
  } else {
    Vec<T, VEC> v;
#pragma unroll
    for (int j = 0; j < VEC; ++j) v.v[j] = col0 + j < N ? p[col0 + j] : static_cast<T>(0.0f);
    return v;
  }
}

template <typename T, int VEC, bool ALIGNED>
__device__ __forceinline__ void store_pack(T* p, int col0, int N, const Vec<T, VEC>& v) {
  if constexpr (ALIGNED) {
    store_vec<T, VEC>(p + col0, v);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (col0 + j < N) p[col0 + j] = v.v[j];
  }
}

// A lane's place in a warp-per-row kernel: its row, the first column of its chunk c, and the
// reductions over the row's lanes. col0(c) is kept as base + c * step, two registers: with one per
// chunk held across the row reduction, ptxas spilled in the 32-element kernels.
template <int VEC>
struct WarpLane {
  int lanes;
  int64_t row;
  bool row_ok;  // row < rows; lanes out of range still take part in the shuffles
  int col_base, col_step;

  __device__ __forceinline__ WarpLane(int log2_lanes, int64_t rows) {
    const int lane = threadIdx.x % kWarp;
    lanes = 1 << log2_lanes;
    row = (static_cast<int64_t>(blockIdx.x) * (kWarpBlock / kWarp) + threadIdx.x / kWarp) * (kWarp >> log2_lanes) +
          (lane >> log2_lanes);
    row_ok = row < rows;
    col_base = (lane & (lanes - 1)) * VEC;
    col_step = lanes * VEC;
  }

  __device__ __forceinline__ int col0(int c) const { return col_base + c * col_step; }

  template <typename A>
  __device__ __forceinline__ A sum(A v) const {
    for (int o = lanes >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    return v;
  }

  template <typename A>
  __device__ __forceinline__ A max(A v) const {
    for (int o = lanes >> 1; o > 0; o >>= 1) {
      const A other = __shfl_xor_sync(kFull, v, o);
      v = other > v ? other : v;
    }
    return v;
  }
};

// Register caps of the forward (blocks of 128 threads an SM). 32 values a lane: 72 registers (7
// blocks); left to itself ptxas aimed at 64 and spilled. 4 values or one 16-byte pack a lane: 32 (16
// blocks, every warp slot), where ptxas otherwise took up to 40.
template <typename T, int ELTS, bool ALIGNED>
constexpr int fwd_warp_min_blocks() {
  if (ELTS == 32) return 7;
  if (ELTS == 4 || (ALIGNED && ELTS * sizeof(T) == 16)) return 16;
  return 1;
}

// DROP: a.drop.enabled, a template parameter so that the kernel without dropout carries no Philox
// code (a third of its instructions).
template <typename T, typename M, int ELTS, bool ALIGNED, bool DROP>
__global__ void __launch_bounds__(kWarpBlock, fwd_warp_min_blocks<T, ELTS, ALIGNED>())
    masked_softmax_fwd_warp(FwdArgs a, int log2_lanes) {
  using A = acc_t<T>;
  constexpr int VEC = WarpVec<T, ALIGNED>::value;
  constexpr int CHUNKS = ELTS / VEC;
  const WarpLane<VEC> w(log2_lanes, a.rows);
  const int64_t row = w.row;
  const int N = a.N;
  const A scale = static_cast<A>(a.scale), lowest = static_cast<A>(a.mask_lowest);

  int64_t x_off = 0, m_off = 0;
  if (w.row_ok) row_offsets(a, row, x_off, m_off);
  const T* x = static_cast<const T*>(a.x) + x_off;

  A z[ELTS];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col0 = w.col0(c);
    if (w.row_ok && col0 < N) {
      const Vec<T, VEC> v = load_pack<T, VEC, ALIGNED>(x, col0, N);
      if constexpr (ALIGNED && !std::is_same_v<M, NoMask>) {
        // The 16-byte path loads the mask in packs too (the host sends other masks down the element
        // path): one load for VEC keys' mask instead of VEC (a bool mask: 8 bytes at once).
        using S = typename MaskRead<M, A>::Storage;
        const Vec<S, VEC> m = load_vec<S, VEC>(static_cast<const S*>(a.mask) + m_off + col0);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          A add;
          z[c * VEC + j] = MaskRead<M, A>::keep(m.v[j], add, lowest) ? static_cast<A>(v.v[j]) * scale + add
                                                                     : A(-INFINITY);
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          z[c * VEC + j] = (ALIGNED || col0 + j < N) ? logit<T, M, A>(a, v.v[j], m_off, col0 + j, scale, lowest)
                                                     : A(-INFINITY);
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) z[c * VEC + j] = A(-INFINITY);
    }
  }

  A mx = A(-INFINITY);
#pragma unroll
  for (int i = 0; i < ELTS; ++i) mx = z[i] > mx ? z[i] : mx;
  mx = w.max(mx);
  const bool dead = mx == A(-INFINITY);  // every key masked
  const A shift = dead ? A(0) : mx;
  A sum = A(0);
#pragma unroll
  for (int i = 0; i < ELTS; ++i) {
    z[i] = exp_acc(z[i] - shift);
    sum += z[i];
  }
  sum = w.sum(sum);
  const A inv = dead ? A(0) : bertkern::rcp_in_range(sum);  // sum in [1, N] or NaN
  if (!w.row_ok) return;

  T* y = static_cast<T*>(a.y) + row * N;
  T* pr = DROP ? static_cast<T*>(a.probs) + row * N : nullptr;
  const Dropout key = make_dropout(DROP ? a.drop.seed : nullptr, a.drop.threshold);
  const A keep_scale = keep_scale_of<A>(a.drop);
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col0 = w.col0(c);
    if (col0 >= N) continue;
    Vec<T, VEC> out, probs;
    if constexpr (DROP) {
      bool keep[VEC];
      keep_flags<VEC>(keep, a.row0 + row, col0, key);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A p = z[c * VEC + j] * inv;
        probs.v[j] = static_cast<T>(p);
        out.v[j] = static_cast<T>(keep[j] ? p * keep_scale : A(0));
      }
      store_pack<T, VEC, ALIGNED>(pr, col0, N, probs);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) out.v[j] = static_cast<T>(z[c * VEC + j] * inv);
    }
    store_pack<T, VEC, ALIGNED>(y, col0, N, out);
  }
}

template <typename T, int ELTS, bool ALIGNED>
__global__ void __launch_bounds__(kWarpBlock) masked_softmax_bwd_warp(BwdArgs a, int log2_lanes) {
  using A = acc_t<T>;
  constexpr int VEC = WarpVec<T, ALIGNED>::value;
  constexpr int CHUNKS = ELTS / VEC;
  const WarpLane<VEC> w(log2_lanes, a.rows);
  const int N = a.N;
  const T* g = static_cast<const T*>(a.grad) + (w.row_ok ? w.row * a.gs : 0);
  const T* pp = static_cast<const T*>(a.probs) + (w.row_ok ? w.row * a.ps : 0);
  const bool drop = a.drop.enabled;
  const Dropout key = make_dropout(drop && w.row_ok ? a.drop.seed : nullptr, a.drop.threshold);

  // The row stays in registers in its own dtype (half the registers of fp32 copies for 16-bit
  // inputs); bit i of `kept` is dropout's verdict on element i. Out-of-range elements load as 0.
  Vec<T, VEC> gv[CHUNKS], pv[CHUNKS];
  uint32_t kept = 0xffffffffu;
  A dot = A(0);
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col0 = w.col0(c);
    if (w.row_ok && col0 < N) {
      gv[c] = load_pack<T, VEC, ALIGNED>(g, col0, N);
      pv[c] = load_pack<T, VEC, ALIGNED>(pp, col0, N);
      if (drop) {
        bool keep[VEC];
        keep_flags<VEC>(keep, w.row, col0, key);
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          if (!keep[j]) kept &= ~(1u << (c * VEC + j));
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A d = (kept >> (c * VEC + j)) & 1u ? static_cast<A>(gv[c].v[j]) : A(0);
        dot += d * static_cast<A>(pv[c].v[j]);
      }
    }
  }
  dot = w.sum(dot);
  if (!w.row_ok) return;

  // dp = dropout'(grad) = grad * keep * keep_scale, so sum(dp * p) = keep_scale * dot.
  const A dp_scale = drop ? keep_scale_of<A>(a.drop) : A(1);
  dot *= dp_scale;
  const A scale = static_cast<A>(a.scale);
  T* dx = static_cast<T*>(a.dx) + w.row * N;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col0 = w.col0(c);
    if (col0 >= N) continue;
    Vec<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A d = (kept >> (c * VEC + j)) & 1u ? static_cast<A>(gv[c].v[j]) * dp_scale : A(0);
      const A p = static_cast<A>(pv[c].v[j]);
      out.v[j] = static_cast<T>(scale * p * (d - dot));
    }
    store_pack<T, VEC, ALIGNED>(dx, col0, N, out);
  }
}

// ------------------------------------------------------------------ block-per-row kernels
template <typename A>
struct MaxSum {
  A m, s;  // running max and sum of exp(z - m)
};

template <typename A>
__device__ __forceinline__ MaxSum<A> combine(MaxSum<A> a, MaxSum<A> b) {
  const A m = a.m > b.m ? a.m : b.m;
  if (m == A(-INFINITY)) return {m, A(0)};
  return {m, a.s * exp_acc(a.m - m) + b.s * exp_acc(b.m - m)};
}

template <typename A>
__device__ __forceinline__ MaxSum<A> block_maxsum(MaxSum<A> v) {
  __shared__ A sm[kRowBlockMax / kWarp], ss[kRowBlockMax / kWarp];
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const MaxSum<A> other{__shfl_xor_sync(kFull, v.m, o), __shfl_xor_sync(kFull, v.s, o)};
    v = combine(v, other);
  }
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  if (lane == 0) {
    sm[warp] = v.m;
    ss[warp] = v.s;
  }
  __syncthreads();
  v = lane < warps ? MaxSum<A>{sm[lane], ss[lane]} : MaxSum<A>{A(-INFINITY), A(0)};
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const MaxSum<A> other{__shfl_xor_sync(kFull, v.m, o), __shfl_xor_sync(kFull, v.s, o)};
    v = combine(v, other);
  }
  return v;  // every warp reduced the same partials: all threads hold the block's result
}

template <typename A>
__device__ __forceinline__ A block_sum(A v) {
  __shared__ A part[kRowBlockMax / kWarp];
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = lane < warps ? part[lane] : A(0);
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// One block per row; thread t handles the 4-column quads t, t + blockDim.x, ...: f(col, keep) for each
// column, keep from half a Philox call per quad when drop (else true).
template <typename F>
__device__ __forceinline__ void for_row_cols(int64_t row, int N, bool drop, const Dropout& key, F&& f) {
  for (int q = threadIdx.x; q * 4 < N; q += blockDim.x) {
    bool keep[4] = {true, true, true, true};
    if (drop) keep_flags<4>(keep, row, q * 4, key);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = q * 4 + j;
      if (col >= N) break;
      f(col, keep[j]);
    }
  }
}

template <typename T, typename M>
__global__ void __launch_bounds__(kRowBlockMax) masked_softmax_fwd_block(FwdArgs a) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const int N = a.N;
  const A scale = static_cast<A>(a.scale), lowest = static_cast<A>(a.mask_lowest);
  int64_t x_off, m_off;
  row_offsets(a, row, x_off, m_off);
  const T* x = static_cast<const T*>(a.x) + x_off;
  const bool drop = a.drop.enabled;
  const Dropout key = make_dropout(drop ? a.drop.seed : nullptr, a.drop.threshold);

  MaxSum<A> ms{A(-INFINITY), A(0)};
  for_row_cols(row, N, false, key, [&](int col, bool) {
    const A z = logit<T, M, A>(a, x[col], m_off, col, scale, lowest);
    if (z > ms.m) {
      ms.s = ms.s * exp_acc(ms.m - z) + A(1);
      ms.m = z;
    } else if (z != A(-INFINITY)) {
      ms.s += exp_acc(z - ms.m);
    }
  });
  ms = block_maxsum(ms);
  const bool dead = ms.m == A(-INFINITY);
  const A shift = dead ? A(0) : ms.m;
  const A inv = dead ? A(0) : bertkern::rcp_in_range(ms.s);  // ms.s in [1, N] or NaN

  T* y = static_cast<T*>(a.y) + row * N;
  T* pr = drop ? static_cast<T*>(a.probs) + row * N : nullptr;
  const A keep_scale = keep_scale_of<A>(a.drop);
  for_row_cols(a.row0 + row, N, drop, key, [&](int col, bool keep) {
    const A p = exp_acc(logit<T, M, A>(a, x[col], m_off, col, scale, lowest) - shift) * inv;
    if (drop) {
      pr[col] = static_cast<T>(p);
      y[col] = static_cast<T>(keep ? p * keep_scale : A(0));
    } else {
      y[col] = static_cast<T>(p);
    }
  });
}

template <typename T>
__global__ void __launch_bounds__(kRowBlockMax) masked_softmax_bwd_block(BwdArgs a) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const int N = a.N;
  const T* g = static_cast<const T*>(a.grad) + row * a.gs;
  const T* pp = static_cast<const T*>(a.probs) + row * a.ps;
  const bool drop = a.drop.enabled;
  const Dropout key = make_dropout(drop ? a.drop.seed : nullptr, a.drop.threshold);
  const A dp_scale = drop ? keep_scale_of<A>(a.drop) : A(1);  // dp = dropout'(grad)

  A dot = A(0);
  for_row_cols(row, N, drop, key, [&](int col, bool keep) {
    const A d = keep ? static_cast<A>(g[col]) * dp_scale : A(0);
    dot += d * static_cast<A>(pp[col]);
  });
  dot = block_sum(dot);

  const A scale = static_cast<A>(a.scale);
  T* dx = static_cast<T*>(a.dx) + row * N;
  for_row_cols(row, N, drop, key, [&](int col, bool keep) {
    const A d = keep ? static_cast<A>(g[col]) * dp_scale : A(0);
    dx[col] = static_cast<T>(scale * static_cast<A>(pp[col]) * (d - dot));
  });
}

// ------------------------------------------------------------------ launchers
int ceil_log2(int64_t n) {
  int l = 0;
  while ((int64_t{1} << l) < n) ++l;
  return l;
}

struct WarpShape {
  int elts, log2_lanes;
  int64_t blocks;
};

// Registers per lane and lanes per row for a row of N keys read VEC at a time.
WarpShape warp_shape(int N, int vec, int64_t rows) {
  const int cap = 1 << ceil_log2(N);                 // <= kWarpMaxN
  const int elts = std::max(vec, cap / kWarp);        // a pack at least; 32 lanes once rows are long
  const int lanes = std::max(1, cap / elts);          // a power of two <= 32
  const int log2_lanes = ceil_log2(lanes);
  const int64_t rows_per_block = (kWarpBlock / kWarp) * (kWarp / lanes);
  return {elts, log2_lanes, (rows + rows_per_block - 1) / rows_per_block};
}

int block_threads(int N) {
  const int quads = (N + 3) / 4;
  return std::min(kRowBlockMax, std::max(kWarp, 1 << ceil_log2(quads)));
}

template <typename T, typename M, bool ALIGNED, int ELTS = WarpVec<T, ALIGNED>::value>
void launch_fwd_warp(const FwdArgs& a, const WarpShape& s, cudaStream_t stream) {
  if constexpr (ELTS < 32) {
    if (s.elts != ELTS) return launch_fwd_warp<T, M, ALIGNED, ELTS * 2>(a, s, stream);
  }
  const auto kernel = a.drop.enabled ? masked_softmax_fwd_warp<T, M, ELTS, ALIGNED, true>
                                     : masked_softmax_fwd_warp<T, M, ELTS, ALIGNED, false>;
  launch(kernel, static_cast<unsigned>(s.blocks), kWarpBlock, 0, stream, a, s.log2_lanes);
}

template <typename T, bool ALIGNED, int ELTS = WarpVec<T, ALIGNED>::value>
void launch_bwd_warp(const BwdArgs& a, const WarpShape& s, cudaStream_t stream) {
  if constexpr (ELTS < 32) {
    if (s.elts != ELTS) return launch_bwd_warp<T, ALIGNED, ELTS * 2>(a, s, stream);
  }
  launch(masked_softmax_bwd_warp<T, ELTS, ALIGNED>, static_cast<unsigned>(s.blocks), kWarpBlock, 0, stream, a,
         s.log2_lanes);
}

// Rows of up to kWarpMaxN keys (not float64): warp(std::bool_constant<aligned>, shape) launches the
// warp kernel; longer rows: one block per row of `block`.
template <typename T, typename Args, typename Warp, typename Block>
void launch_rows(const char* fn, const Args& a, bool aligned, cudaStream_t stream, Warp&& warp, Block* block) {
  if constexpr (!std::is_same_v<T, double>) {
    if (a.N <= kWarpMaxN) {
      const WarpShape s = warp_shape(a.N, aligned ? WarpVec<T, true>::value : WarpVec<T, false>::value, a.rows);
      BK_CHECK(s.blocks <= std::numeric_limits<int32_t>::max(), fn, ": too many rows (", a.rows, ")");
      if (aligned) {
        warp(std::true_type{}, s);
      } else {
        warp(std::false_type{}, s);
      }
      return;
    }
  }
  BK_CHECK(a.rows <= std::numeric_limits<int32_t>::max(), fn, ": too many rows (", a.rows, ")");
  launch(block, static_cast<unsigned>(a.rows), block_threads(a.N), 0, stream, a);
}

template <typename T, typename M>
void launch_fwd(const FwdArgs& a, bool aligned, cudaStream_t stream) {
  launch_rows<T>(
      "masked_softmax_fwd", a, aligned, stream,
      [&](auto al, const WarpShape& s) { launch_fwd_warp<T, M, decltype(al)::value>(a, s, stream); },
      masked_softmax_fwd_block<T, M>);
}

template <typename T>
void launch_bwd(const BwdArgs& a, bool aligned, cudaStream_t stream) {
  launch_rows<T>(
      "masked_softmax_bwd", a, aligned, stream,
      [&](auto al, const WarpShape& s) { launch_bwd_warp<T, decltype(al)::value>(a, s, stream); },
      masked_softmax_bwd_block<T>);
}

template <typename M>
double lowest_of() {
  if constexpr (std::is_same_v<M, NoMask> || std::is_same_v<M, BoolMask>) {
    return 0.0;
  } else {
    return static_cast<double>(std::numeric_limits<M>::lowest());
  }
}

DropoutArgs dropout_args(const char* fn, double dropout_p, const std::optional<at::Tensor>& seed,
                         const at::Tensor& like) {
  const at::Tensor s = bertkern::checked_seed(fn, seed, dropout_p, like);
  if (!s.defined()) return DropoutArgs{nullptr, 0u, 1.0, 1.0f, false};
  const double keep_scale = bertkern::dropout_scale(dropout_p);
  return DropoutArgs{s.data_ptr<int64_t>(), bertkern::dropout_threshold(dropout_p), keep_scale,
                     static_cast<float>(keep_scale), true};
}

std::tuple<at::Tensor, at::Tensor> masked_softmax_fwd(const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                                                      double scale, double dropout_p,
                                                      const std::optional<at::Tensor>& seed) {
  constexpr const char* fn = "masked_softmax_fwd";
  BK_CHECK(is_device_tensor(scores), fn, ": scores must be a CUDA tensor, got ", scores.device());
  BK_CHECK(scores.dim() == 4, fn, ": scores must be 4-D [B, H, S_q, S_k], got ", scores.dim(), " dims");
  BK_CHECK(is_kernel_dtype(scores.scalar_type()), fn,
              ": scores must be float32, float16, bfloat16 or float64, got ", scores.scalar_type());
  BK_CHECK(scores.size(3) <= 1 || scores.stride(3) == 1, fn,
              ": scores must have unit stride along the keys (dim 3), got stride ", scores.stride(3));
  BK_CHECK(scores.size(3) <= std::numeric_limits<int32_t>::max() / 2, fn, ": too many keys (", scores.size(3), ")");
  const bool has_mask = mask.has_value() && mask->defined();
  if (has_mask) {
    BK_CHECK(mask->device() == scores.device(), fn, ": mask is on ", mask->device(), " but scores is on ",
                scores.device());
    BK_CHECK(mask->sizes() == scores.sizes(), fn, ": mask must be a [B, H, S_q, S_k] view of scores' shape ",
                shape_str(scores.sizes()), " (expand it: broadcast dims with stride 0), got ",
                shape_str(mask->sizes()));
    const auto mt = mask->scalar_type();
    BK_CHECK(mt == at::kBool || mt == at::kFloat || mt == scores.scalar_type(), fn,
                ": mask must be bool, float32 or the scores' dtype (", scores.scalar_type(), "), got ", mt);
  }
  const DeviceScope scope(scores);
  const DropoutArgs drop = dropout_args(fn, dropout_p, seed, scores);

  const auto opts = scores.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor y = at::empty(scores.sizes(), opts);
  at::Tensor probs = drop.enabled ? at::empty(scores.sizes(), opts) : at::empty({0}, opts);
  if (y.numel() == 0) return {y, probs};

  FwdArgs a{};
  a.x = scores.data_ptr();
  a.mask = has_mask ? mask->data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.probs = drop.enabled ? probs.data_ptr() : nullptr;
  a.N = static_cast<int>(scores.size(3));
  a.xs_b = scores.stride(0);
  a.xs_h = scores.stride(1);
  a.xs_q = scores.stride(2);
  if (has_mask) {
    a.ms_b = mask->stride(0);
    a.ms_h = mask->stride(1);
    a.ms_q = mask->stride(2);
    a.ms_k = mask->stride(3);
  }
  a.scale = scale;
  a.drop = drop;

  // 16-byte packs need every row start aligned: the base, the strides of the non-trivial dims, N.
  const int vec = 16 / static_cast<int>(scores.element_size());
  bool vec_ok = a.N % vec == 0 && bertkern::is_aligned(a.x, 16);
  for (int d = 0; d < 3; ++d) vec_ok = vec_ok && (scores.size(d) == 1 || scores.stride(d) % vec == 0);
  // The 16-byte path loads the mask in packs of vec keys too, which need the same of its rows: unit key
  // stride, aligned base and strides. A mask without them sends the row down the element path (one
  // path per kernel: a second, key by key, in the 16-byte kernel cost it a fifth of its instructions).
  if (has_mask) {
    vec_ok = vec_ok && a.ms_k == 1 && bertkern::is_aligned(a.mask, vec * mask->element_size());
    for (int d = 0; d < 3; ++d) vec_ok = vec_ok && (scores.size(d) == 1 || mask->stride(d) % vec == 0);
  }

  // Launches of whole batch entries, fewer than 2^31 rows each, so that the kernels' row math is 32-bit.
  const int64_t B = scores.size(0), per_b = scores.size(1) * scores.size(2);
  BK_CHECK(per_b <= kMaxLaunchRows, fn, ": too many rows per batch entry (H x S_q = ", per_b, ")");
  a.div_q = Div32(static_cast<uint32_t>(scores.size(2)));
  a.div_h = Div32(static_cast<uint32_t>(scores.size(1)));
  const int64_t chunk = kMaxLaunchRows / per_b;  // batch entries per launch

  const cudaStream_t stream = scope.stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), fn, [&] {
    using T = scalar_t;
    const auto run = [&](auto mask_type, double lowest) {
      a.mask_lowest = lowest;
      for (int64_t b0 = 0; b0 < B; b0 += chunk) {
        FwdArgs c = a;
        c.row0 = b0 * per_b;
        c.rows = std::min(chunk, B - b0) * per_b;
        c.x = static_cast<const T*>(a.x) + b0 * a.xs_b;
        c.mask = has_mask ? static_cast<const char*>(a.mask) + b0 * a.ms_b * mask->element_size() : nullptr;
        c.y = static_cast<T*>(a.y) + c.row0 * a.N;
        c.probs = drop.enabled ? static_cast<T*>(a.probs) + c.row0 * a.N : nullptr;
        launch_fwd<T, decltype(mask_type)>(c, vec_ok, stream);
      }
    };
    if (!has_mask) {
      run(NoMask{}, 0.0);
    } else if (mask->scalar_type() == at::kBool) {
      run(BoolMask{}, 0.0);
    } else if (mask->scalar_type() == scores.scalar_type()) {
      run(T{}, lowest_of<T>());
    } else {
      run(float{}, lowest_of<float>());
    }
  });
  return {y, probs};
}

at::Tensor masked_softmax_bwd(const at::Tensor& grad, const at::Tensor& probs, double scale, double dropout_p,
                              const std::optional<at::Tensor>& seed) {
  constexpr const char* fn = "masked_softmax_bwd";
  BK_CHECK(is_device_tensor(probs), fn, ": probs must be a CUDA tensor, got ", probs.device());
  BK_CHECK(grad.device() == probs.device(), fn, ": grad is on ", grad.device(), " but probs is on ",
              probs.device());
  BK_CHECK(probs.dim() == 2, fn, ": probs must be 2-D [rows, S_k], got ", probs.dim(), " dims");
  BK_CHECK(grad.sizes() == probs.sizes(), fn, ": grad must have probs' shape ", shape_str(probs.sizes()), ", got ",
              shape_str(grad.sizes()));
  BK_CHECK(is_kernel_dtype(probs.scalar_type()), fn,
              ": probs must be float32, float16, bfloat16 or float64, got ", probs.scalar_type());
  BK_CHECK(grad.scalar_type() == probs.scalar_type(), fn, ": grad dtype ", grad.scalar_type(),
              " does not match probs dtype ", probs.scalar_type());
  BK_CHECK(probs.size(1) <= 1 || (probs.stride(1) == 1 && grad.stride(1) == 1), fn,
              ": grad and probs must have unit stride along the keys, got ", grad.stride(1), " and ", probs.stride(1));
  BK_CHECK(probs.size(1) <= std::numeric_limits<int32_t>::max() / 2, fn, ": too many keys (", probs.size(1), ")");
  const DeviceScope scope(probs);
  const DropoutArgs drop = dropout_args(fn, dropout_p, seed, probs);

  at::Tensor dx = at::empty(probs.sizes(), probs.options().memory_format(at::MemoryFormat::Contiguous));
  if (dx.numel() == 0) return dx;

  BwdArgs a{};
  a.grad = grad.data_ptr();
  a.probs = probs.data_ptr();
  a.dx = dx.data_ptr();
  a.rows = probs.size(0);
  a.N = static_cast<int>(probs.size(1));
  a.gs = grad.stride(0);
  a.ps = probs.stride(0);
  a.scale = scale;
  a.drop = drop;

  const int vec = 16 / static_cast<int>(probs.element_size());
  const bool vec_ok = a.N % vec == 0 && bertkern::is_aligned(a.grad, 16) && bertkern::is_aligned(a.probs, 16) &&
                      (a.rows == 1 || (a.gs % vec == 0 && a.ps % vec == 0));

  const cudaStream_t stream = scope.stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), fn,
                                  [&] { launch_bwd<scalar_t>(a, vec_ok, stream); });
  return dx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(BERTKERN_OPS, m) {
  m.def("masked_softmax_fwd(Tensor scores, Tensor? mask, float scale, float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  m.def("masked_softmax_bwd(Tensor grad, Tensor probs, float scale, float dropout_p, Tensor? seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(BERTKERN_OPS, BERTKERN_DEVICE, m) {
  m.impl("masked_softmax_fwd", &masked_softmax_fwd);
  m.impl("masked_softmax_bwd", &masked_softmax_bwd);
}
