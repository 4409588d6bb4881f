// add_layer_norm: y = layer_norm(h), h = dropout(x + x_bias) + residual over the last dim, and its
// backward, as torch.ops.bertkern_cuda ops (the Python op bertkern::add_layer_norm calls them); and
// embedding_layer_norm's forward, h = word[ids] + type[token_type_ids] + pos[position_ids] gathered
// by the same forward kernels (their input side is a template parameter: FwdParams / EmbParams), its
// backward being add_layer_norm_bwd's plus torch's index_add_ (bertkern/ops/layer_norm.py).
//
// Inputs are 2-D [M, N] row views with unit column stride and any row stride; outputs are fresh
// contiguous tensors; outputs not computed come back as empty tensors (the Python op's convention).
// Math and statistics are fp32 (fp64 for fp64), two-pass over the row held in registers. The pre-norm
// sum is rounded to the input dtype before its statistics (as_stored).
//
// Layout. A "team" of W warps owns one row at a time; each thread holds ITERS vectors of V elements
// (16-byte loads when every row start is 16-byte aligned, else V = 1), so the row lives in registers
// and the statistics are exact two-pass sums. Narrow rows get a single warp (shuffles only) and
// several teams per block; W and ITERS are picked per N to leave few lanes idle (BERT-base fp16:
// 768 = 1 warp x 32 lanes x 3 x 8 forward, 3 warps x 32 lanes x 8 backward). Rows wider than the
// register budget (16 warps x 32 lanes x 16 values: N > 8192 on the vector path, N > 4096 on the
// scalar one), and float64, use a block-per-row loop kernel that re-reads the row.
//
// Dropout: the Philox scheme of philox.cuh (the same mask on every backend); the backward kernel
// regenerates the forward's mask from the seed.
//
// Backward column sums (dweight, dbias, dx_bias) are deterministic: each team keeps fp32 partials in
// registers over its rows, the teams of a block fold them in a fixed order through shared memory into
// one partial row per block, and a reduction kernel sums the partial rows in a fixed order.
#include "common.cuh"
#include "philox.cuh"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace bertkern {
namespace ln {

constexpr int kMaxWarpsPerRow = 16;  // a team is at most 512 threads (the launch bound below)
constexpr int kTeamThreads = 512;    // __launch_bounds__ of the team kernels: <= 128 registers/thread
constexpr int kBlockTarget = 256;    // threads per block to aim for when teams are narrow
constexpr int kLoopThreads = 256;    // block size of the loop kernels
constexpr int kBwdLightValues = 8;   // values a backward thread holds without crowding registers (plan_team)

// ------------------------------------------------------------------------------- reductions
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  // Butterfly: every lane ends with the same bits (a + b == b + a), so a team agrees on its stats.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the `wpr` warps of the calling thread's team (warps [team * wpr, team * wpr + wpr) of the
// block). Every thread of the block must call it (it may __syncthreads); all get the same bits.
// smem holds one value per warp of the block (<= 32).
template <typename A>
__device__ __forceinline__ A team_sum(A v, int wpr, A* smem) {
  v = warp_sum(v);
  if (wpr == 1) return v;  // uniform over the block
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // the previous call's readers are done with smem
  if ((threadIdx.x & 31) == 0) smem[warp] = v;
  __syncthreads();
  // Lane i of each of the team's warps takes warp i's sum (wpr <= 16), and a butterfly adds them: the
  // same bits in every thread, in a fixed order. (A loop over the wpr sums became ~170 instructions of
  // unrolled copies and remainders per call.)
  const int lane = threadIdx.x & 31;
  return warp_sum(lane < wpr ? smem[warp - warp % wpr + lane] : A(0));
}

template <typename A>
__device__ __forceinline__ A rsqrt_(A v) {
  return A(1) / sqrt(v);  // IEEE sqrt and division (no fast math in this build)
}

// sum / N for a float sum and a row length N < 2^24, from inv_n = 1.0 / N (double, from the host): the
// double product is within 2^-52 of the quotient, which is never that close to a float rounding
// midpoint (but for a quotient exactly halfway between two denormals), so the float it rounds to is
// IEEE's sum / N. Inline code where a float division calls its slow path, around which ptxas kept a
// stack frame (the team kernel at V = 1, ITERS = 8).
__device__ __forceinline__ float div_n(float sum, double inv_n) {
  return static_cast<float>(static_cast<double>(sum) * inv_n);
}

// The pre-norm sum rounded to T, as stored for the backward and as eager normalizes it. Statistics of
// the unrounded sum leave the rounding error in the backward's xhat, times rstd (1 / sqrt(eps) at N = 1).
template <typename T>
__device__ __forceinline__ acc_t<T> as_stored(acc_t<T> h) {
  return static_cast<acc_t<T>>(static_cast<T>(h));
}

// ------------------------------------------------------------------------------ parameters
// The forwards' common half: the affine parameters, the outputs and the row geometry. A forward's
// params derive from it and add their input side (P below): P::T, a per-row state
// `typename P::Row r = p.row(row)` (row pointers, ids, the dropout key) and
// `p.template load<V>(r, col, h)`, h[j] = the pre-norm sum of column col + j, not yet rounded.
template <typename T_>
struct NormParams {
  using T = T_;
  const T* weight;    // nullable, [N]
  const T* bias;      // nullable, [N]
  T* y;               // [M, N] contiguous
  T* prenorm;         // nullable, [M, N] contiguous
  acc_t<T>* mean;     // [M]
  acc_t<T>* rstd;     // [M]
  int64_t M, N;
  acc_t<T> eps;
  double inv_n;  // 1.0 / N
};

// add_layer_norm: h = dropout(x + x_bias) + residual.
template <typename T>
struct FwdParams : NormParams<T> {
  using A = acc_t<T>;
  static constexpr bool kDropout = true;  // may have dropout (seed != nullptr)
  const T* x;
  const T* residual;  // nullable
  const T* x_bias;    // nullable, [N]
  const int64_t* seed;  // nullable: no dropout
  int64_t stride_x, stride_r;
  A scale;
  uint32_t thresh;

  struct Row {
    int64_t row;
    Dropout drop;
  };
  __device__ __forceinline__ Row row(int64_t r) const { return {r, make_dropout(seed, thresh)}; }

  // DROP: whether the kernel was compiled with dropout (the team kernel without it has no Philox code).
  template <int V, bool DROP = true>
  __device__ __forceinline__ void load(const Row& r, int64_t col, A (&h)[V]) const {
    const Vec<T, V> xv = load_vec<T, V>(x + r.row * stride_x + col);
#pragma unroll
    for (int j = 0; j < V; ++j) h[j] = static_cast<A>(xv.v[j]);
    if (x_bias != nullptr) {
      const Vec<T, V> bv = load_vec<T, V>(x_bias + col);
#pragma unroll
      for (int j = 0; j < V; ++j) h[j] += static_cast<A>(bv.v[j]);
    }
    if (DROP && r.drop.on) {
      const uint32_t bits = keep_bits<V>(r.drop, r.row, col);
#pragma unroll
      for (int j = 0; j < V; ++j) h[j] = ((bits >> j) & 1u) ? h[j] * scale : A(0);
    }
    if (residual != nullptr) {
      const Vec<T, V> rv = load_vec<T, V>(residual + r.row * stride_r + col);
#pragma unroll
      for (int j = 0; j < V; ++j) h[j] += static_cast<A>(rv.v[j]);
    }
  }
};

// A [B, S] index view of int64 or int32 ids, any strides (0 along a broadcast dim).
struct IdView {
  const void* p;  // nullptr: absent
  int64_t stride_b, stride_s;
  bool i32;
  __device__ __forceinline__ int64_t at(uint32_t b, uint32_t s) const {
    const int64_t off = b * stride_b + s * stride_s;
    return i32 ? static_cast<int64_t>(static_cast<const int32_t*>(p)[off]) : static_cast<const int64_t*>(p)[off];
  }
};

// embedding_layer_norm: h = word[ids] + type[token_type_ids] + pos[position_ids] (HF's order, summed in
// fp32 and rounded once, as the Triton kernel does). Row m is token (m / S, m % S). An id outside its
// table makes the row NaN (y, prenorm, mean, rstd) and reads nothing: no out-of-bounds read, and no
// device assert (which would end the process's CUDA context); eager raises there.
template <typename T>
struct EmbParams : NormParams<T> {
  using A = acc_t<T>;
  static constexpr bool kDropout = false;
  const T* word;
  const T* pos;   // nullable
  const T* type;  // nullable
  int64_t stride_word, stride_pos, stride_type;
  int64_t rows_word, rows_pos, rows_type;
  IdView ids, pids, tids;  // pids absent: arange(S); tids absent: zeros
  uint32_t S;              // M < 2^31 (host check): 32-bit row / S

  struct Row {
    const T* word;
    const T* type;  // nullptr: no type term
    const T* pos;   // nullptr: no position term
    bool ok;        // every id within its table
  };
  __device__ __forceinline__ Row row(int64_t r) const {
    const uint32_t b = static_cast<uint32_t>(r) / S, s = static_cast<uint32_t>(r) - b * S;
    const int64_t id = ids.at(b, s);
    const int64_t tid = tids.p != nullptr ? tids.at(b, s) : 0;
    const int64_t pid = pids.p != nullptr ? pids.at(b, s) : static_cast<int64_t>(s);
    // Unsigned compares: negative ids are out of range too.
    const bool ok = static_cast<uint64_t>(id) < static_cast<uint64_t>(rows_word) &&
                    (type == nullptr || static_cast<uint64_t>(tid) < static_cast<uint64_t>(rows_type)) &&
                    (pos == nullptr || static_cast<uint64_t>(pid) < static_cast<uint64_t>(rows_pos));
    return {word + id * stride_word, type == nullptr ? nullptr : type + tid * stride_type,
            pos == nullptr ? nullptr : pos + pid * stride_pos, ok};
  }

  template <int V, bool DROP = false>
  __device__ __forceinline__ void load(const Row& r, int64_t col, A (&h)[V]) const {
    if (!r.ok) {
#pragma unroll
      for (int j = 0; j < V; ++j) h[j] = std::numeric_limits<A>::quiet_NaN();
      return;
    }
    const Vec<T, V> wv = load_vec<T, V>(r.word + col);
#pragma unroll
    for (int j = 0; j < V; ++j) h[j] = static_cast<A>(wv.v[j]);
    if (r.type != nullptr) {
      const Vec<T, V> tv = load_vec<T, V>(r.type + col);
#pragma unroll
      for (int j = 0; j < V; ++j) h[j] += static_cast<A>(tv.v[j]);
    }
    if (r.pos != nullptr) {
      const Vec<T, V> pv = load_vec<T, V>(r.pos + col);
#pragma unroll
      for (int j = 0; j < V; ++j) h[j] += static_cast<A>(pv.v[j]);
    }
  }
};

template <typename T>
struct BwdParams {
  const T* dy;
  const T* dprenorm;  // nullable
  const T* h;
  const acc_t<T>* mean;
  const acc_t<T>* rstd;
  const T* weight;      // nullable
  const int64_t* seed;  // nullable: no dropout, dx == dh
  T* dh;                // [M, N] contiguous
  T* dx;                // nullable, [M, N] contiguous
  acc_t<T>* dw_part;    // nullable, [parts, N]
  acc_t<T>* db_part;    // nullable
  acc_t<T>* dxb_part;   // nullable
  int64_t M, N, stride_dy, stride_dp, stride_h;
  acc_t<T> scale;
  uint32_t thresh;
};

// ------------------------------------------------------------------------------ team kernels
// Block = teams_per_block teams of wpr warps; team t of block b starts at row b * teams_per_block + t
// (forward: one row per team). Thread i of a team owns columns (it * team_threads + i) * V + [0, V).
// P: FwdParams<T> (add_layer_norm) or EmbParams<T> (embedding_layer_norm). DROP: P has dropout on
// (p.seed != nullptr), a template parameter so that the kernel without it has no Philox code.
template <typename P, int V, int ITERS, bool DROP>
__global__ void __launch_bounds__(kTeamThreads) ln_fwd_team_kernel(P p, int wpr) {
  using T = typename P::T;
  using A = acc_t<T>;
  __shared__ A red[32];
  const int team_threads = 32 * wpr;
  const int team = threadIdx.x / team_threads;
  const int lane = threadIdx.x % team_threads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / team_threads) + team;
  const bool row_ok = row < p.M;  // no early exit: team_sum may synchronize the block
  const int64_t N = p.N;
  typename P::Row src{};
  if (row_ok) src = p.row(row);

  A h[ITERS][V];
  A sum = A(0);
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t col = (static_cast<int64_t>(it) * team_threads + lane) * V;
    // N % V == 0 on the vector path (V == 1 otherwise), so col < N covers the whole vector.
    if (row_ok && col < N) {
      p.template load<V, DROP>(src, col, h[it]);
#pragma unroll
      for (int j = 0; j < V; ++j) h[it][j] = as_stored<T>(h[it][j]);
      if (p.prenorm != nullptr) {
        Vec<T, V> out;
#pragma unroll
        for (int j = 0; j < V; ++j) out.v[j] = static_cast<T>(h[it][j]);
        store_vec<T, V>(p.prenorm + row * N + col, out);
      }
#pragma unroll
      for (int j = 0; j < V; ++j) sum += h[it][j];
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) h[it][j] = A(0);
    }
  }
  static_assert(std::is_same_v<A, float>, "float64 rows take the loop kernel");
  const A mean = div_n(team_sum(sum, wpr, red), p.inv_n);
  A sq = A(0);
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t col = (static_cast<int64_t>(it) * team_threads + lane) * V;
    if (col < N) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A d = h[it][j] - mean;
        sq += d * d;
      }
    }
  }
  const A var = div_n(team_sum(sq, wpr, red), p.inv_n);
  const A rstd = rsqrt_(var + p.eps);
  if (!row_ok) return;  // no barriers below
  if (lane == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t col = (static_cast<int64_t>(it) * team_threads + lane) * V;
    if (col < N) {
      Vec<T, V> wv, bv, out;
      if (p.weight != nullptr) wv = load_vec<T, V>(p.weight + col);
      if (p.bias != nullptr) bv = load_vec<T, V>(p.bias + col);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        A v = (h[it][j] - mean) * rstd;
        if (p.weight != nullptr) v *= static_cast<A>(wv.v[j]);
        if (p.bias != nullptr) v += static_cast<A>(bv.v[j]);
        out.v[j] = static_cast<T>(v);
      }
      store_vec<T, V>(p.y + row * N + col, out);
    }
  }
}

// Writes each team's column partial acc[ITERS][V] into partial row blockIdx.x, folding the teams of
// the block in team order through shared memory (smem: N values of A). Called by every thread.
template <typename A, int V, int ITERS>
__device__ __forceinline__ void fold_partials(const A (&acc)[ITERS][V], A* __restrict__ out, A* smem, int64_t N,
                                              int team, int teams, int lane, int team_threads) {
  if (teams == 1) {
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t col = (static_cast<int64_t>(it) * team_threads + lane) * V;
      if (col < N) {
#pragma unroll
        for (int j = 0; j < V; ++j) out[col + j] = acc[it][j];
      }
    }
    return;
  }
  for (int t = 0; t < teams; ++t) {
    if (team == t) {
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        const int64_t col = (static_cast<int64_t>(it) * team_threads + lane) * V;
        if (col < N) {
#pragma unroll
          for (int j = 0; j < V; ++j) smem[col + j] = (t == 0 ? A(0) : smem[col + j]) + acc[it][j];
        }
      }
    }
    __syncthreads();
  }
  for (int64_t c = threadIdx.x; c < N; c += blockDim.x) out[c] = smem[c];
  __syncthreads();  // smem is reused by the next fold
}

// The backward's register caps: 64 for fp16 rows of one 16-byte vector a thread (BERT's 768 and 1024:
// 4 blocks of 256 threads an SM; left to itself ptxas took up to 79; bf16's conversions and fp32's two
// vectors spill at 64), up to 128 for the others (left to itself ptxas stopped at 64 and spilled in the
// scalar ITERS = 4 kernel on sm_80).
template <typename T, int V, int ITERS>
constexpr int bwd_team_min_blocks() {
  return std::is_same_v<T, c10::Half> && V == 8 && ITERS == 1 ? 2 : 1;
}

// Backward: the block's teams walk rows [base + team] for base = blockIdx.x * teams, += gridDim.x *
// teams (the same trip count for the whole block, so team_sum may synchronize). DROP: p.seed !=
// nullptr, a template parameter so that the kernel without dropout has no Philox code (a third of its
// loop).
template <typename T, int V, int ITERS, bool DROP>
__global__ void __launch_bounds__(kTeamThreads, bwd_team_min_blocks<T, V, ITERS>())
    add_ln_bwd_team_kernel(BwdParams<T> p, int wpr) {
  using A = acc_t<T>;
  __shared__ A red[32];
  BERTKERN_DYNAMIC_SMEM(fold_raw);  // N values of A when teams > 1
  A* fold = reinterpret_cast<A*>(fold_raw);
  const int team_threads = 32 * wpr;
  const int teams = blockDim.x / team_threads;
  const int team = threadIdx.x / team_threads;
  const int lane = threadIdx.x % team_threads;
  const int64_t N = p.N;
  const A inv_n = A(1) / static_cast<A>(N);
  const Dropout drop = make_dropout(DROP ? p.seed : nullptr, p.thresh);

  A dw[ITERS][V], db[ITERS][V], dxb[ITERS][V];
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
#pragma unroll
    for (int j = 0; j < V; ++j) dw[it][j] = db[it][j] = dxb[it][j] = A(0);
  }

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * teams; base < p.M;
       base += static_cast<int64_t>(gridDim.x) * teams) {
    const int64_t row = base + team;
    const bool row_ok = row < p.M;
    const A mean = row_ok ? p.mean[row] : A(0);
    const A rstd = row_ok ? p.rstd[row] : A(0);
    A xhat[ITERS][V], g[ITERS][V];
    A s1 = A(0), s2 = A(0);
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t col = (static_cast<int64_t>(it) * team_threads + lane) * V;
      if (row_ok && col < N) {
        const Vec<T, V> hv = load_vec<T, V>(p.h + row * p.stride_h + col);
        const Vec<T, V> gv = load_vec<T, V>(p.dy + row * p.stride_dy + col);
        Vec<T, V> wv;  // re-read per row from L1 rather than held in registers
        if (p.weight != nullptr) wv = load_vec<T, V>(p.weight + col);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const A dyv = static_cast<A>(gv.v[j]);
          xhat[it][j] = (static_cast<A>(hv.v[j]) - mean) * rstd;
          g[it][j] = p.weight != nullptr ? dyv * static_cast<A>(wv.v[j]) : dyv;
          s1 += g[it][j] * xhat[it][j];
          s2 += g[it][j];
          dw[it][j] += dyv * xhat[it][j];
          db[it][j] += dyv;
        }
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) xhat[it][j] = g[it][j] = A(0);
      }
    }
    const A c1 = team_sum(s1, wpr, red) * inv_n;
    const A c2 = team_sum(s2, wpr, red) * inv_n;
    if (row_ok) {
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        const int64_t col = (static_cast<int64_t>(it) * team_threads + lane) * V;
        if (col < N) {
          A d[V];
#pragma unroll
          for (int j = 0; j < V; ++j) d[j] = (g[it][j] - xhat[it][j] * c1 - c2) * rstd;
          if (p.dprenorm != nullptr) {
            const Vec<T, V> pv = load_vec<T, V>(p.dprenorm + row * p.stride_dp + col);
#pragma unroll
            for (int j = 0; j < V; ++j) d[j] += static_cast<A>(pv.v[j]);
          }
          Vec<T, V> out;
#pragma unroll
          for (int j = 0; j < V; ++j) out.v[j] = static_cast<T>(d[j]);
          store_vec<T, V>(p.dh + row * N + col, out);
          if (DROP && drop.on) {
            const uint32_t bits = keep_bits<V>(drop, row, col);
#pragma unroll
            for (int j = 0; j < V; ++j) {
              d[j] = ((bits >> j) & 1u) ? d[j] * p.scale : A(0);
              out.v[j] = static_cast<T>(d[j]);
            }
            store_vec<T, V>(p.dx + row * N + col, out);
          }
#pragma unroll
          for (int j = 0; j < V; ++j) dxb[it][j] += d[j];
        }
      }
    }
  }

  A* outs[3] = {p.dw_part, p.db_part, p.dxb_part};
  const int64_t part = static_cast<int64_t>(blockIdx.x) * N;
  if (outs[0] != nullptr) fold_partials<A, V, ITERS>(dw, outs[0] + part, fold, N, team, teams, lane, team_threads);
  if (outs[1] != nullptr) fold_partials<A, V, ITERS>(db, outs[1] + part, fold, N, team, teams, lane, team_threads);
  if (outs[2] != nullptr) fold_partials<A, V, ITERS>(dxb, outs[2] + part, fold, N, team, teams, lane, team_threads);
}

// ------------------------------------------------------------------------------ loop kernels
// One block per row (grid-strided), scalar accesses, any N and alignment; float64 always comes here.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* smem) {
  return team_sum(v, static_cast<int>(blockDim.x >> 5), smem);
}

// The pre-norm sum of one column, rounded as stored.
template <typename P>
__device__ __forceinline__ acc_t<typename P::T> prenorm_at(const P& p, const typename P::Row& src, int64_t c) {
  acc_t<typename P::T> h[1];
  p.template load<1>(src, c, h);
  return as_stored<typename P::T>(h[0]);
}

template <typename P>
__global__ void __launch_bounds__(kLoopThreads) ln_fwd_loop_kernel(P p) {
  using T = typename P::T;
  using A = acc_t<T>;
  __shared__ A red[32];
  const int64_t N = p.N;
  for (int64_t row = blockIdx.x; row < p.M; row += gridDim.x) {
    const typename P::Row src = p.row(row);
    A s = A(0);
    for (int64_t c = threadIdx.x; c < N; c += blockDim.x) {
      const A h = prenorm_at(p, src, c);
      if (p.prenorm != nullptr) p.prenorm[row * N + c] = static_cast<T>(h);
      s += h;
    }
    const A mean = block_sum(s, red) / static_cast<A>(N);
    A sq = A(0);
    for (int64_t c = threadIdx.x; c < N; c += blockDim.x) {
      const A d = prenorm_at(p, src, c) - mean;
      sq += d * d;
    }
    const A rstd = rsqrt_(block_sum(sq, red) / static_cast<A>(N) + p.eps);
    if (threadIdx.x == 0) {
      p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
    for (int64_t c = threadIdx.x; c < N; c += blockDim.x) {
      A v = (prenorm_at(p, src, c) - mean) * rstd;
      if (p.weight != nullptr) v *= static_cast<A>(p.weight[c]);
      if (p.bias != nullptr) v += static_cast<A>(p.bias[c]);
      p.y[row * N + c] = static_cast<T>(v);
    }
  }
}

// Column partials: thread i owns columns i, i + blockDim.x, ... of its block's partial rows for every
// row the block takes, so the read-modify-write needs no atomics; the block's first row writes them
// (no zero-fill before the launch), the later rows add to them.
template <typename T>
__global__ void __launch_bounds__(kLoopThreads) add_ln_bwd_loop_kernel(BwdParams<T> p) {
  using A = acc_t<T>;
  __shared__ A red[32];
  const int64_t N = p.N;
  const A inv_n = A(1) / static_cast<A>(N);
  const Dropout drop = make_dropout(p.seed, p.thresh);
  const int64_t part = static_cast<int64_t>(blockIdx.x) * N;
  for (int64_t row = blockIdx.x; row < p.M; row += gridDim.x) {
    const bool first = row == blockIdx.x;
    const A mean = p.mean[row];
    const A rstd = p.rstd[row];
    A s1 = A(0), s2 = A(0);
    for (int64_t c = threadIdx.x; c < N; c += blockDim.x) {
      const A xhat = (static_cast<A>(p.h[row * p.stride_h + c]) - mean) * rstd;
      A g = static_cast<A>(p.dy[row * p.stride_dy + c]);
      if (p.weight != nullptr) g *= static_cast<A>(p.weight[c]);
      s1 += g * xhat;
      s2 += g;
    }
    const A c1 = block_sum(s1, red) * inv_n;
    const A c2 = block_sum(s2, red) * inv_n;
    for (int64_t c = threadIdx.x; c < N; c += blockDim.x) {
      const A xhat = (static_cast<A>(p.h[row * p.stride_h + c]) - mean) * rstd;
      const A dyv = static_cast<A>(p.dy[row * p.stride_dy + c]);
      const A g = p.weight != nullptr ? dyv * static_cast<A>(p.weight[c]) : dyv;
      A d = (g - xhat * c1 - c2) * rstd;
      if (p.dprenorm != nullptr) d += static_cast<A>(p.dprenorm[row * p.stride_dp + c]);
      p.dh[row * N + c] = static_cast<T>(d);
      if (drop.on) {
        d = (keep_bits<1>(drop, row, c) & 1u) ? d * p.scale : A(0);
        p.dx[row * N + c] = static_cast<T>(d);
      }
      if (p.dw_part != nullptr) p.dw_part[part + c] = (first ? A(0) : p.dw_part[part + c]) + dyv * xhat;
      if (p.db_part != nullptr) p.db_part[part + c] = (first ? A(0) : p.db_part[part + c]) + dyv;
      if (p.dxb_part != nullptr) p.dxb_part[part + c] = (first ? A(0) : p.dxb_part[part + c]) + d;
    }
  }
}

// ------------------------------------------------------------------------------------ host side
// An optional [M, N] input like `ref` (shape, dtype, device), or an undefined tensor for None.
at::Tensor like_rows(const char* op, const char* name, const std::optional<at::Tensor>& t, const at::Tensor& ref) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_rows(op, name, *t);
  BK_CHECK(t->sizes() == ref.sizes(), op, ": ", name, " shape ", shape_str(t->sizes()), " does not match ",
              shape_str(ref.sizes()));
  BK_CHECK(t->scalar_type() == ref.scalar_type(), op, ": ", name, " dtype ", t->scalar_type(),
              " does not match ", ref.scalar_type());
  BK_CHECK(t->device() == ref.device(), op, ": ", name, " is on ", t->device(), " but the input is on ",
              ref.device());
  return *t;
}

// An optional [N] vector like `ref`'s rows, made contiguous, or an undefined tensor for None.
at::Tensor like_col(const char* op, const char* name, const std::optional<at::Tensor>& t, const at::Tensor& ref) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  BK_CHECK(t->dim() == 1 && t->size(0) == ref.size(1), op, ": ", name, " must have shape [", ref.size(1),
              "], got ", shape_str(t->sizes()));
  BK_CHECK(t->scalar_type() == ref.scalar_type(), op, ": ", name, " dtype ", t->scalar_type(),
              " does not match ", ref.scalar_type());
  BK_CHECK(t->device() == ref.device(), op, ": ", name, " is on ", t->device(), " but the input is on ",
              ref.device());
  return t->contiguous();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Team layout: ITERS vectors per thread and warps per row.
struct Team {
  int iters = 0;  // 0: the row does not fit in registers
  int wpr = 0;
};

int teams_per_block(int wpr) { return std::max(1, kBlockTarget / (32 * wpr)); }

// Calls f(std::integral_constant<int, V>{}, std::integral_constant<int, ITERS>{}) for the compiled
// (V, ITERS) pairs: 16-byte vectors with <= 16 elements per thread, and the scalar path with <= 8
// (16 scalar columns per thread spilled in the backward kernel). Returns false for anything else.
// The forward also has 24 values per thread (3 x 8 fp16 / bf16, 6 x 4 fp32), so a 768-wide row
// (BERT-base) is one warp: shuffles only, no block barriers. The backward stays at <= 16: its three
// column partials per value would spill at 24.
template <typename T, bool kFwd, typename F>
bool with_team(int v, int iters, F&& f) {
  if constexpr (std::is_same_v<T, double>) {
    return false;  // float64 uses the loop kernels: fewer instantiations to build
  } else {
    constexpr int VW = vec_width<T>();
    using I1 = std::integral_constant<int, 1>;
    using I2 = std::integral_constant<int, 2>;
    using I3 = std::integral_constant<int, 3>;
    using I4 = std::integral_constant<int, 4>;
    using I6 = std::integral_constant<int, 6>;
    using I8 = std::integral_constant<int, 8>;
    using IV = std::integral_constant<int, VW>;
    auto run = [&](auto vec, auto it) {  // f returns void; "found a compiled pair" is the result
      f(vec, it);
      return true;
    };
    if (v == VW) {
      if (iters == 1) return run(IV{}, I1{});
      if (iters == 2) return run(IV{}, I2{});
      if constexpr (VW <= 4) {
        if (iters == 4) return run(IV{}, I4{});
      }
      if constexpr (kFwd && VW == 8) {
        if (iters == 3) return run(IV{}, I3{});
      }
      if constexpr (kFwd && VW == 4) {
        if (iters == 6) return run(IV{}, I6{});
      }
      return false;
    }
    if (v == 1) {
      if (iters == 1) return run(I1{}, I1{});
      if (iters == 4) return run(I1{}, I4{});
      if (iters == 8) return run(I1{}, I8{});
    }
    return false;
  }
}

// The layout for rows of N among with_team<T, kFwd>'s compiled pairs (asked, not listed again here)
// that leaves the fewest idle lanes; iters 0 if none fits. Ties: in the backward, at most
// kBwdLightValues values a thread first (three column partials a value: 16 fp16 values took 118
// registers, 2 CTAs/SM of 256 threads, against 64 and 4 at 8); then fewer warps (fewer block barriers).
template <typename T, bool kFwd>
Team plan_team(int64_t N, bool vec) {
  const int v = vec ? vec_width<T>() : 1;
  Team best;
  double best_util = -1.0;
  const auto rank = [&](int iters, int64_t wpr) { return std::make_pair(!kFwd && v * iters > kBwdLightValues, wpr); };
  for (int iters = 1; iters <= 8; ++iters) {
    if (!with_team<T, kFwd>(v, iters, [](auto, auto) {})) continue;  // not a compiled pair
    const int64_t per_warp = 32LL * v * iters;
    const int64_t wpr = ceil_div<int64_t>(N, per_warp);
    if (wpr > kMaxWarpsPerRow) continue;
    const double util = static_cast<double>(N) / static_cast<double>(per_warp * wpr);
    if (util > best_util + 1e-9 ||
        (std::abs(util - best_util) <= 1e-9 && rank(iters, wpr) < rank(best.iters, best.wpr))) {
      best = {iters, static_cast<int>(wpr)};
      best_util = util;
    }
  }
  return best;
}

bool rows_aligned(const void* p, int64_t stride, int64_t M, int v) {
  return p == nullptr || (is_aligned(p, 16) && (M == 1 || stride % v == 0));
}

using FwdOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// A forward's outputs (y, prenorm or empty, mean, rstd): y and prenorm `rows` + [N] in `like`'s dtype,
// mean and rstd `rows` in the accumulation dtype.
FwdOutputs fwd_outputs(const at::Tensor& like, c10::IntArrayRef rows, int64_t N, bool store_prenorm) {
  std::vector<int64_t> shape(rows.begin(), rows.end());
  shape.push_back(N);
  const auto acc_type = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {at::empty(shape, like.options()),
          store_prenorm ? at::empty(shape, like.options()) : at::empty({0}, like.options()),
          at::empty(rows, like.options().dtype(acc_type)), at::empty(rows, like.options().dtype(acc_type))};
}

// Fills p's NormParams half from the outputs and the affine parameters.
template <typename T>
void set_norm(NormParams<T>& p, const FwdOutputs& out, const at::Tensor& weight, const at::Tensor& bias, int64_t M,
              int64_t N, double eps) {
  using A = acc_t<T>;
  const auto& [y, prenorm, mean, rstd] = out;
  p.weight = ptr_or_null<T>(weight);
  p.bias = ptr_or_null<T>(bias);
  p.y = y.mutable_data_ptr<T>();
  p.prenorm = prenorm.numel() > 0 ? prenorm.mutable_data_ptr<T>() : nullptr;
  p.mean = mean.mutable_data_ptr<A>();
  p.rstd = rstd.mutable_data_ptr<A>();
  p.M = M;
  p.N = N;
  p.eps = static_cast<A>(eps);
  p.inv_n = 1.0 / static_cast<double>(N);
}

// Whether the outputs and the affine parameters allow 16-byte vectors (the inputs are the caller's).
template <typename T>
bool norm_aligned(const NormParams<T>& p) {
  constexpr int VW = vec_width<T>();
  return p.N % VW == 0 && rows_aligned(p.y, p.N, p.M, VW) && rows_aligned(p.prenorm, p.N, p.M, VW) &&
         rows_aligned(p.weight, 0, 1, VW) && rows_aligned(p.bias, 0, 1, VW);
}

// One launch of a forward (p.M > 0): the team kernel with the layout plan_team picks, else the loop kernel.
template <typename P>
void launch_fwd(const char* op, const P& p, bool vec, c10::DeviceIndex device, cudaStream_t stream) {
  using T = typename P::T;
  constexpr int VW = vec_width<T>();
  const Team team = plan_team<T, true>(p.N, vec);
  const bool launched = team.iters > 0 && with_team<T, true>(vec ? VW : 1, team.iters, [&](auto v, auto iters) {
    const int teams = teams_per_block(team.wpr);
    const int64_t blocks = ceil_div<int64_t>(p.M, teams);
    BK_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": too many rows (", p.M, ")");
    auto kernel = ln_fwd_team_kernel<P, decltype(v)::value, decltype(iters)::value, false>;
    if constexpr (P::kDropout) {
      if (p.seed != nullptr) kernel = ln_fwd_team_kernel<P, decltype(v)::value, decltype(iters)::value, true>;
    }
    launch(kernel, static_cast<unsigned>(blocks), 32 * team.wpr * teams, 0, stream, p, team.wpr);
  });
  if (!launched) {
    const int64_t blocks = std::min<int64_t>(p.M, 8LL * num_sms(device));
    launch(ln_fwd_loop_kernel<P>, static_cast<unsigned>(blocks), kLoopThreads, 0, stream, p);
  }
}

FwdOutputs add_layer_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& residual_opt,
                              const std::optional<at::Tensor>& weight_opt, const std::optional<at::Tensor>& bias_opt,
                              const std::optional<at::Tensor>& x_bias_opt, const std::optional<at::Tensor>& seed_opt,
                              double eps, double dropout_p, bool store_prenorm) {
  constexpr const char* op = "bertkern_cuda::add_layer_norm_fwd";
  check_rows(op, "x", x);
  const at::Tensor residual = like_rows(op, "residual", residual_opt, x);
  const at::Tensor weight = like_col(op, "weight", weight_opt, x);
  const at::Tensor bias = like_col(op, "bias", bias_opt, x);
  const at::Tensor x_bias = like_col(op, "x_bias", x_bias_opt, x);
  const at::Tensor seed = checked_seed(op, seed_opt, dropout_p, x);
  BK_CHECK(eps >= 0.0, op, ": eps must be non-negative, got ", eps);
  const DeviceScope scope(x);

  const int64_t M = x.size(0), N = x.size(1);
  BK_CHECK(N > 0, op, ": x must have a non-empty last dim");
  FwdOutputs out = fwd_outputs(x, {M}, N, store_prenorm);
  if (M == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "add_layer_norm_fwd", [&] {
    using A = acc_t<scalar_t>;
    FwdParams<scalar_t> p;
    set_norm<scalar_t>(p, out, weight, bias, M, N, eps);
    p.x = x.const_data_ptr<scalar_t>();
    p.residual = ptr_or_null<scalar_t>(residual);
    p.x_bias = ptr_or_null<scalar_t>(x_bias);
    p.seed = seed.defined() ? seed.const_data_ptr<int64_t>() : nullptr;
    p.stride_x = x.stride(0);
    p.stride_r = residual.defined() ? residual.stride(0) : 0;
    p.scale = static_cast<A>(dropout_scale(dropout_p));
    p.thresh = dropout_threshold(dropout_p);

    constexpr int VW = vec_width<scalar_t>();
    const bool vec = norm_aligned<scalar_t>(p) && rows_aligned(p.x, p.stride_x, M, VW) &&
                     rows_aligned(p.residual, p.stride_r, M, VW) && rows_aligned(p.x_bias, 0, 1, VW);
    launch_fwd(op, p, vec, x.device().index(), scope.stream());
  });
  return out;
}

// An id tensor of embedding_layer_norm_fwd: int64 or int32 on `ref`'s device, broadcastable to [B, S]
// (at most 2-D). Its view with stride 0 along broadcast dims, or an absent one for None.
IdView id_view(const char* op, const char* name, const std::optional<at::Tensor>& t, int64_t B, int64_t S,
               const at::Tensor& ref) {
  if (!t.has_value() || !t->defined()) return {nullptr, 0, 0, false};
  const at::ScalarType st = t->scalar_type();
  BK_CHECK(st == at::kLong || st == at::kInt, op, ": ", name, " must be int64 or int32, got ", st);
  BK_CHECK(t->device() == ref.device(), op, ": ", name, " is on ", t->device(), " but input_ids is on ", ref.device());
  const int64_t want[2] = {B, S};
  int64_t strides[2] = {0, 0};
  bool ok = t->dim() <= 2;
  for (int64_t d = 0; ok && d < t->dim(); ++d) {  // aligned from the right, as broadcasting does
    const int64_t k = 2 - t->dim() + d, size = t->size(d);
    ok = size == want[k] || size == 1;
    strides[k] = size == 1 ? 0 : t->stride(d);
  }
  BK_CHECK(ok, op, ": ", name, " of shape ", shape_str(t->sizes()), " does not broadcast to input_ids' [", B, ", ",
           S, "]");
  return {t->const_data_ptr(), strides[0], strides[1], st == at::kInt};
}

// A table of embedding_layer_norm_fwd ([rows, N] with unit column stride, word's dtype and device), or
// an undefined tensor for None.
at::Tensor table(const char* op, const char* name, const std::optional<at::Tensor>& t, const at::Tensor& word) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_rows(op, name, *t);
  BK_CHECK(t->size(1) == word.size(1) && t->size(0) > 0, op, ": ", name, " must have shape [rows, ", word.size(1),
           "], got ", shape_str(t->sizes()));
  BK_CHECK(t->scalar_type() == word.scalar_type(), op, ": ", name, " dtype ", t->scalar_type(),
           " does not match word_embeddings dtype ", word.scalar_type());
  BK_CHECK(t->device() == word.device(), op, ": ", name, " is on ", t->device(), " but word_embeddings is on ",
           word.device());
  return *t;
}

// embedding_layer_norm's forward: input_ids [B, S]; position_ids / token_type_ids (None: arange(S) /
// zeros) broadcastable to it, ignored without their table. Outputs y, prenorm [B, S, N], mean, rstd [B, S].
FwdOutputs embedding_layer_norm_fwd(const at::Tensor& input_ids, const std::optional<at::Tensor>& position_ids,
                                    const std::optional<at::Tensor>& token_type_ids, const at::Tensor& word,
                                    const std::optional<at::Tensor>& pos_opt, const std::optional<at::Tensor>& type_opt,
                                    const std::optional<at::Tensor>& weight_opt,
                                    const std::optional<at::Tensor>& bias_opt, double eps, bool store_prenorm) {
  constexpr const char* op = "bertkern_cuda::embedding_layer_norm_fwd";
  check_rows(op, "word_embeddings", word);
  const int64_t N = word.size(1);
  BK_CHECK(N > 0, op, ": word_embeddings must have a non-empty last dim");
  BK_CHECK(input_ids.dim() == 2, op, ": input_ids must be 2-D [B, S], got shape ", shape_str(input_ids.sizes()));
  const int64_t B = input_ids.size(0), S = input_ids.size(1), M = B * S;
  const at::Tensor pos = table(op, "position_embeddings", pos_opt, word);
  const at::Tensor type = table(op, "token_type_embeddings", type_opt, word);
  const IdView ids = id_view(op, "input_ids", input_ids, B, S, word);
  const IdView pids = pos.defined() ? id_view(op, "position_ids", position_ids, B, S, word) : IdView{};
  const IdView tids = type.defined() ? id_view(op, "token_type_ids", token_type_ids, B, S, word) : IdView{};
  const at::Tensor weight = like_col(op, "weight", weight_opt, word);
  const at::Tensor bias = like_col(op, "bias", bias_opt, word);
  BK_CHECK(eps >= 0.0, op, ": eps must be non-negative, got ", eps);
  BK_CHECK(M <= std::numeric_limits<int32_t>::max(), op, ": too many tokens (", M, ")");
  const DeviceScope scope(word);

  FwdOutputs out = fwd_outputs(word, input_ids.sizes(), N, store_prenorm);
  if (M == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, word.scalar_type(), "embedding_layer_norm_fwd", [&] {
    EmbParams<scalar_t> p;
    set_norm<scalar_t>(p, out, weight, bias, M, N, eps);
    p.word = word.const_data_ptr<scalar_t>();
    p.pos = ptr_or_null<scalar_t>(pos);
    p.type = ptr_or_null<scalar_t>(type);
    p.stride_word = word.stride(0);
    p.stride_pos = pos.defined() ? pos.stride(0) : 0;
    p.stride_type = type.defined() ? type.stride(0) : 0;
    p.rows_word = word.size(0);
    p.rows_pos = pos.defined() ? pos.size(0) : 0;
    p.rows_type = type.defined() ? type.size(0) : 0;
    p.ids = ids;
    p.pids = pids;
    p.tids = tids;
    p.S = static_cast<uint32_t>(S);

    constexpr int VW = vec_width<scalar_t>();
    const bool vec = norm_aligned<scalar_t>(p) && rows_aligned(p.word, p.stride_word, p.rows_word, VW) &&
                     rows_aligned(p.pos, p.stride_pos, p.rows_pos, VW) &&
                     rows_aligned(p.type, p.stride_type, p.rows_type, VW);
    launch_fwd(op, p, vec, word.device().index(), scope.stream());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_bwd(
    const at::Tensor& grad, const std::optional<at::Tensor>& grad_prenorm_opt, const at::Tensor& h,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight_opt,
    const std::optional<at::Tensor>& seed_opt, double dropout_p, bool need_dweight, bool need_dbias,
    bool need_dx_bias) {
  constexpr const char* op = "bertkern_cuda::add_layer_norm_bwd";
  check_rows(op, "h", h);
  const at::Tensor dy = like_rows(op, "grad", grad, h);
  BK_CHECK(dy.defined(), op, ": grad must be a tensor");
  const at::Tensor dprenorm = like_rows(op, "grad_prenorm", grad_prenorm_opt, h);
  const at::Tensor weight = like_col(op, "weight", weight_opt, h);
  const at::Tensor seed = checked_seed(op, seed_opt, dropout_p, h);
  const int64_t M = h.size(0), N = h.size(1);
  BK_CHECK(N > 0, op, ": h must have a non-empty last dim");
  const auto acc_type = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto check_stats = [&](const char* name, const at::Tensor& t) {
    BK_CHECK(t.dim() == 1 && t.size(0) == M && t.is_contiguous(), op, ": ", name,
                " must be a contiguous [", M, "] tensor, got shape ", shape_str(t.sizes()));
    BK_CHECK(t.scalar_type() == acc_type, op, ": ", name, " must be ", acc_type, ", got ", t.scalar_type());
    BK_CHECK(t.device() == h.device(), op, ": ", name, " is on ", t.device(), " but h is on ", h.device());
  };
  check_stats("mean", mean);
  check_stats("rstd", rstd);
  const DeviceScope scope(h);

  at::Tensor dh = at::empty({M, N}, h.options());
  at::Tensor dx = seed.defined() ? at::empty({M, N}, h.options()) : at::empty({0}, h.options());
  const bool need[3] = {need_dweight, need_dbias, need_dx_bias};
  at::Tensor sums[3];
  for (int k = 0; k < 3; ++k) sums[k] = at::empty({need[k] ? N : 0}, h.options());
  if (M == 0) {
    for (int k = 0; k < 3; ++k) sums[k].zero_();  // the sum over no rows
    return {dh, dx, sums[0], sums[1], sums[2]};
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, h.scalar_type(), "add_layer_norm_bwd", [&] {
    using A = acc_t<scalar_t>;
    BwdParams<scalar_t> p;
    p.dy = dy.const_data_ptr<scalar_t>();
    p.dprenorm = ptr_or_null<scalar_t>(dprenorm);
    p.h = h.const_data_ptr<scalar_t>();
    p.mean = mean.const_data_ptr<A>();
    p.rstd = rstd.const_data_ptr<A>();
    p.weight = ptr_or_null<scalar_t>(weight);
    p.seed = seed.defined() ? seed.const_data_ptr<int64_t>() : nullptr;
    p.dh = dh.mutable_data_ptr<scalar_t>();
    p.dx = seed.defined() ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    p.M = M;
    p.N = N;
    p.stride_dy = dy.stride(0);
    p.stride_dp = dprenorm.defined() ? dprenorm.stride(0) : 0;
    p.stride_h = h.stride(0);
    p.scale = static_cast<A>(dropout_scale(dropout_p));
    p.thresh = dropout_threshold(dropout_p);

    constexpr int VW = vec_width<scalar_t>();
    const bool vec = N % VW == 0 && rows_aligned(p.dy, p.stride_dy, M, VW) &&
                     rows_aligned(p.dprenorm, p.stride_dp, M, VW) && rows_aligned(p.h, p.stride_h, M, VW) &&
                     rows_aligned(p.dh, N, M, VW) && rows_aligned(p.dx, N, M, VW) &&
                     rows_aligned(p.weight, 0, 1, VW);
    const cudaStream_t stream = scope.stream();
    const int sms = num_sms(h.device().index());
    const auto part_opts = h.options().dtype(acc_type);
    at::Tensor parts[3];
    const auto alloc_parts = [&](int64_t rows) {
      for (int k = 0; k < 3; ++k) {
        if (need[k]) parts[k] = at::empty({rows, N}, part_opts);
      }
      p.dw_part = need[0] ? parts[0].mutable_data_ptr<A>() : nullptr;
      p.db_part = need[1] ? parts[1].mutable_data_ptr<A>() : nullptr;
      p.dxb_part = need[2] ? parts[2].mutable_data_ptr<A>() : nullptr;
    };

    const Team team = plan_team<scalar_t, false>(N, vec);
    int64_t blocks = 0;
    const bool launched = team.iters > 0 && with_team<scalar_t, false>(vec ? VW : 1, team.iters, [&](auto v, auto iters) {
      auto kernel = p.seed != nullptr ? add_ln_bwd_team_kernel<scalar_t, decltype(v)::value, decltype(iters)::value, true>
                                      : add_ln_bwd_team_kernel<scalar_t, decltype(v)::value, decltype(iters)::value, false>;
      const int teams = teams_per_block(team.wpr);
      const int threads = 32 * team.wpr * teams;
      const size_t smem = teams > 1 ? static_cast<size_t>(N) * sizeof(A) : 0;  // <= 2048 * 4 bytes
      // One full wave of blocks (each keeps one partial row per column sum), never more than the rows.
      const int per_sm = blocks_per_sm(kernel, threads, smem, h.device().index());
      blocks = std::min<int64_t>(static_cast<int64_t>(per_sm) * sms, ceil_div<int64_t>(M, teams));
      alloc_parts(blocks);
      launch(kernel, static_cast<unsigned>(blocks), threads, smem, stream, p, team.wpr);
    });
    if (!launched) {
      blocks = std::min<int64_t>(M, 4LL * sms);
      alloc_parts(blocks);
      launch(add_ln_bwd_loop_kernel<scalar_t>, static_cast<unsigned>(blocks), kLoopThreads, 0, stream, p);
    }
    // One launch for every column sum asked for.
    ColumnSums<scalar_t, A> col{};
    for (int k = 0; k < 3; ++k) {
      if (!need[k]) continue;
      col.partial[col.count] = parts[k].const_data_ptr<A>();
      col.out[col.count++] = sums[k].mutable_data_ptr<scalar_t>();
    }
    column_sum(col, blocks, N, stream);
    // `parts` are freed while the kernels may still run: the caching allocator only hands their memory
    // to work queued later on this stream.
  });
  return {dh, dx, sums[0], sums[1], sums[2]};
}

}  // namespace ln
}  // namespace bertkern

TORCH_LIBRARY_FRAGMENT(BERTKERN_OPS, m) {
  m.def(
      "add_layer_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, Tensor? x_bias, "
      "Tensor? seed, float eps, float dropout_p, bool store_prenorm) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "add_layer_norm_bwd(Tensor grad, Tensor? grad_prenorm, Tensor h, Tensor mean, Tensor rstd, "
      "Tensor? weight, Tensor? seed, float dropout_p, bool need_dweight, bool need_dbias, bool need_dx_bias) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "embedding_layer_norm_fwd(Tensor input_ids, Tensor? position_ids, Tensor? token_type_ids, "
      "Tensor word_embeddings, Tensor? position_embeddings, Tensor? token_type_embeddings, Tensor? weight, "
      "Tensor? bias, float eps, bool store_prenorm) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(BERTKERN_OPS, BERTKERN_DEVICE, m) {
  m.impl("add_layer_norm_fwd", &bertkern::ln::add_layer_norm_fwd);
  m.impl("add_layer_norm_bwd", &bertkern::ln::add_layer_norm_bwd);
  m.impl("embedding_layer_norm_fwd", &bertkern::ln::embedding_layer_norm_fwd);
}
