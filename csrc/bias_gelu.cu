// bias_gelu: y = gelu(x + bias) and its backward (dx, dbias), as torch.ops.bertkern_cuda ops.
//
// x (and dy) are 2-D [M, N] with unit column stride and any row stride (row views of a bigger
// tensor); outputs are fresh contiguous tensors. Math is fp32 (fp64 for fp64), cast on store.
// Each thread owns one column vector (16 bytes) and walks rows, so bias is loaded once per thread
// and dbias is a per-thread running sum: no atomics, the result is bit-for-bit reproducible.
#include "common.cuh"

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

namespace bertkern {
namespace {

constexpr int kThreads = 256;  // per block; keeps tiles small enough for many blocks per SM
constexpr int kUnroll = 4;     // rows in flight per thread: 4 (fwd) or 8 (bwd) 16-byte loads
constexpr int kMaxGridY = 65535;

constexpr double kSqrt1_2 = 0.70710678118654752440;     // 1/sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;  // 1/sqrt(2 pi)
constexpr double kTanhK = 0.79788456080286535588;       // sqrt(2/pi)
constexpr double kTanhC = 0.044715;

// Precise libdevice functions in both widths; the build deliberately has no --use_fast_math so
// erff/expf keep their ~2 ulp accuracy.
__device__ __forceinline__ float erf_(float v) { return erff(v); }
__device__ __forceinline__ double erf_(double v) { return erf(v); }
__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }

// sigmoid(2u) == 0.5 * (1 + tanh(u)). exp overflowing to inf gives 1/inf = 0, never NaN.
template <typename A>
__device__ __forceinline__ A sigmoid2_(A u) {
  return A(1) / (A(1) + exp_(A(-2) * u));
}

template <bool TANH, typename A>
__device__ __forceinline__ A gelu(A h) {
  if constexpr (TANH) {
    return h * sigmoid2_(A(kTanhK) * (h + A(kTanhC) * h * h * h));
  } else {
    return A(0.5) * h * (A(1) + erf_(h * A(kSqrt1_2)));
  }
}

// d gelu / dh, the same formulas as bertkern.reference.gelu_grad.
template <bool TANH, typename A>
__device__ __forceinline__ A gelu_grad(A h) {
  if constexpr (TANH) {
    const A u = A(kTanhK) * (h + A(kTanhC) * h * h * h);
    // s = sigmoid(2u) and its complement sigmoid(-2u) (not 1 - s: that loses precision where s
    // rounds to 1) from one exp and one division: with e = exp(-2|u|) in (0, 1] and r = 1 / (1 + e),
    // they are r and e * r, and nothing overflows.
    const A e = exp_(A(-2) * fabs(u));
    const A r = rcp_in_range(A(1) + e);  // in [1, 2] (or NaN): the fast path
    const A s = u >= A(0) ? r : e * r;
    return s + A(2) * h * (e * r * r) * A(kTanhK) * (A(1) + A(3 * kTanhC) * h * h);
  } else {
    return A(0.5) * (A(1) + erf_(h * A(kSqrt1_2))) + h * exp_(A(-0.5) * h * h) * A(kInvSqrt2Pi);
  }
}

// One thread's kUnroll rows r0 + u * blockDim.y (those < end): every row's loads first, load(u, r)
// (memory-level parallelism), then out.v[j] = op(u, j) per row, stored at dst + r * N + col.
template <typename T, int V, typename Load, typename Op>
__device__ __forceinline__ void unrolled_rows(int64_t r0, int64_t end, Load&& load, Op&& op, T* dst, int64_t N,
                                              int64_t col) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t r = r0 + static_cast<int64_t>(u) * blockDim.y;
    if (r < end) load(u, r);
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t r = r0 + static_cast<int64_t>(u) * blockDim.y;
    if (r < end) {
      Vec<T, V> out;
#pragma unroll
      for (int j = 0; j < V; ++j) out.v[j] = static_cast<T>(op(u, j));
      store_vec<T, V>(dst + r * N + col, out);
    }
  }
}

// Forward. Block (bx, by): bx threads across column vectors, by rows; each thread does kUnroll rows
// per row block, loads first then computes (memory-level parallelism), and grid-strides over row
// blocks when M needs more than 65535 of them. V = elements per access (16 bytes, or 1 = scalar).
template <typename T, int V, bool TANH>
__global__ void __launch_bounds__(kThreads) bias_gelu_fwd_kernel(
    const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
    int64_t M, int64_t N, int64_t stride_x, int64_t row_blocks) {
  using A = acc_t<T>;
  // The host guarantees N % V == 0, so col < N means the whole vector [col, col + V) is in bounds.
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (col >= N) return;  // no barriers below, so idle threads may leave

  A b[V];
  if (bias != nullptr) {
    const Vec<T, V> bv = load_vec<T, V>(bias + col);
#pragma unroll
    for (int j = 0; j < V; ++j) b[j] = static_cast<A>(bv.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) b[j] = A(0);
  }

  const int64_t rows_per_block = static_cast<int64_t>(blockDim.y) * kUnroll;
  for (int64_t rb = blockIdx.y; rb < row_blocks; rb += gridDim.y) {
    Vec<T, V> in[kUnroll];
    unrolled_rows<T, V>(
        rb * rows_per_block + threadIdx.y, M, [&](int u, int64_t r) { in[u] = load_vec<T, V>(x + r * stride_x + col); },
        [&](int u, int j) { return gelu<TANH>(static_cast<A>(in[u].v[j]) + b[j]); }, y, N, col);
  }
}

// Backward. Same tiling; block (blockIdx.x, blockIdx.y) owns a column tile and the row chunk
// [blockIdx.y * rows_per_chunk, ...). Each thread sums dh (fp32, before rounding, as the reference
// does) over its rows; the block folds its `by` row lanes in shared memory in a fixed order and
// writes one partial row partial[blockIdx.y, :]. column_sum (common.cuh) then sums the partial rows.
template <typename T, int V, bool TANH>
__global__ void __launch_bounds__(kThreads) bias_gelu_bwd_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ dx,
    acc_t<T>* __restrict__ partial, int64_t M, int64_t N, int64_t stride_dy, int64_t stride_x,
    int64_t rows_per_chunk) {
  using A = acc_t<T>;
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  const bool active = col < N;  // inactive threads stay for the __syncthreads below

  A b[V];
  A db[V];
#pragma unroll
  for (int j = 0; j < V; ++j) b[j] = db[j] = A(0);
  if (active && bias != nullptr) {
    const Vec<T, V> bv = load_vec<T, V>(bias + col);
#pragma unroll
    for (int j = 0; j < V; ++j) b[j] = static_cast<A>(bv.v[j]);
  }

  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t row_end = row_begin + rows_per_chunk < M ? row_begin + rows_per_chunk : M;
  const int64_t step = static_cast<int64_t>(blockDim.y) * kUnroll;
  if (active) {
    for (int64_t r0 = row_begin + threadIdx.y; r0 < row_end; r0 += step) {
      Vec<T, V> g[kUnroll];
      Vec<T, V> v[kUnroll];
      unrolled_rows<T, V>(
          r0, row_end,
          [&](int u, int64_t r) {
            g[u] = load_vec<T, V>(dy + r * stride_dy + col);
            v[u] = load_vec<T, V>(x + r * stride_x + col);
          },
          [&](int u, int j) {
            const A d = static_cast<A>(g[u].v[j]) * gelu_grad<TANH>(static_cast<A>(v[u].v[j]) + b[j]);
            db[j] += d;
            return d;
          },
          dx, N, col);
    }
  }

  if (partial == nullptr) return;  // no bias: the same for every thread, so leaving is safe
  if (blockDim.y > 1) {
    // Dynamic shared memory: [by][bx * V] of A, sized by the host only when by > 1.
    BERTKERN_DYNAMIC_SMEM(smem_raw);
    A* smem = reinterpret_cast<A*>(smem_raw);
#pragma unroll
    for (int j = 0; j < V; ++j) smem[(threadIdx.y * blockDim.x + threadIdx.x) * V + j] = db[j];
    __syncthreads();
    if (threadIdx.y != 0) return;
    for (unsigned k = 1; k < blockDim.y; ++k) {  // fixed order: deterministic
#pragma unroll
      for (int j = 0; j < V; ++j) db[j] += smem[(k * blockDim.x + threadIdx.x) * V + j];
    }
  }
  if (!active) return;
  A* out = partial + static_cast<int64_t>(blockIdx.y) * N + col;
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = db[j];
}

// ------------------------------------------------------------------------------------- host side

struct Tile {
  int bx;              // threads across column vectors (a multiple of 32: whole warps per row)
  int by;              // threads across rows
  int64_t col_blocks;  // blocks along the columns
};

// Split nv column vectors into the fewest <= 256-wide tiles, each rounded up to whole warps, so few
// threads idle: BERT's 3072 fp16 columns = 384 vectors -> 2 tiles of 192, not 256 + 128.
Tile pick_tile(int64_t nv) {
  const int64_t tiles = ceil_div<int64_t>(nv, kThreads);
  const int bx = static_cast<int>(std::min<int64_t>(round_up<int64_t>(ceil_div<int64_t>(nv, tiles), 32), kThreads));
  const int by = std::max(1, kThreads / bx);
  return {bx, by, ceil_div<int64_t>(nv, bx)};
}

bool parse_approximate(const char* op, c10::string_view approximate) {
  BK_CHECK(approximate == "none" || approximate == "tanh", op,
              ": approximate must be 'none' or 'tanh', got '", approximate, "'");
  return approximate == "tanh";
}

// Returns the bias as a contiguous tensor, or an undefined tensor for None.
at::Tensor checked_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  const at::Tensor& b = *bias;
  BK_CHECK(b.dim() == 1 && b.size(0) == x.size(1), op, ": bias must have shape [", x.size(1),
              "] (x.size(1)), got ", shape_str(b.sizes()));
  BK_CHECK(b.scalar_type() == x.scalar_type(), op, ": bias dtype ", b.scalar_type(),
              " does not match x dtype ", x.scalar_type());
  BK_CHECK(b.device() == x.device(), op, ": bias is on ", b.device(), " but x is on ", x.device());
  return b.contiguous();  // [N]: copying a strided one is cheaper than a strided kernel path
}

dim3 grid_of(int64_t col_blocks, int64_t grid_y) {
  BK_CHECK(col_blocks <= std::numeric_limits<int32_t>::max(), "bertkern: too many columns");
  return dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(grid_y));
}

// Calls f(std::integral_constant<int, V>, std::bool_constant<TANH>) for the runtime choice.
template <int V, typename F>
void with_variant(bool vec, bool tanh, F&& f) {
  if (vec) {
    if (tanh) f(std::integral_constant<int, V>{}, std::true_type{});
    else f(std::integral_constant<int, V>{}, std::false_type{});
  } else {
    if (tanh) f(std::integral_constant<int, 1>{}, std::true_type{});
    else f(std::integral_constant<int, 1>{}, std::false_type{});
  }
}

at::Tensor bias_gelu_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias_opt,
                         c10::string_view approximate) {
  constexpr const char* op = "bertkern_cuda::bias_gelu_fwd";
  const bool tanh = parse_approximate(op, approximate);
  check_rows(op, "x", x);
  const at::Tensor bias = checked_bias(op, bias_opt, x);
  const DeviceScope scope(x);

  const int64_t M = x.size(0);
  const int64_t N = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;  // an empty grid is a launch error

  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "bias_gelu_fwd", [&] {
    constexpr int V = vec_width<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const int64_t sx = x.stride(0);
    // 16-byte accesses need every row start aligned: base pointers, row stride (only read when
    // M > 1) and N (the output's row stride) all multiples of 16 bytes.
    const bool vec = N % V == 0 && (M == 1 || sx % V == 0) && is_aligned(xp, 16) && is_aligned(yp, 16) &&
                     (bp == nullptr || is_aligned(bp, 16));
    const Tile tile = pick_tile(vec ? N / V : N);
    const int64_t row_blocks = ceil_div<int64_t>(M, static_cast<int64_t>(tile.by) * kUnroll);
    const dim3 grid = grid_of(tile.col_blocks, std::min<int64_t>(row_blocks, kMaxGridY));
    const dim3 block(tile.bx, tile.by);
    with_variant<V>(vec, tanh, [&](auto v, auto t) {
      launch(bias_gelu_fwd_kernel<scalar_t, decltype(v)::value, decltype(t)::value>, grid, block, 0, scope.stream(),
             xp, bp, yp, M, N, sx, row_blocks);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                 const std::optional<at::Tensor>& bias_opt,
                                                 c10::string_view approximate) {
  constexpr const char* op = "bertkern_cuda::bias_gelu_bwd";
  const bool tanh = parse_approximate(op, approximate);
  check_rows(op, "x", x);
  check_rows(op, "dy", dy);
  BK_CHECK(dy.sizes() == x.sizes(), op, ": dy shape ", shape_str(dy.sizes()), " does not match x shape ",
              shape_str(x.sizes()));
  BK_CHECK(dy.scalar_type() == x.scalar_type(), op, ": dy dtype ", dy.scalar_type(),
              " does not match x dtype ", x.scalar_type());
  BK_CHECK(dy.device() == x.device(), op, ": dy is on ", dy.device(), " but x is on ", x.device());
  const at::Tensor bias = checked_bias(op, bias_opt, x);
  const DeviceScope scope(x);

  const int64_t M = x.size(0);
  const int64_t N = x.size(1);
  at::Tensor dx = at::empty({M, N}, x.options());
  // No bias: an empty tensor stands in for None (the schema returns two Tensors).
  at::Tensor dbias = bias.defined() ? at::empty({N}, bias.options()) : at::empty({0}, x.options());
  if (M == 0 || N == 0) {
    if (bias.defined()) dbias.zero_();  // the sum over no rows
    return {dx, dbias};
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "bias_gelu_bwd", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = vec_width<scalar_t>();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const int64_t sdy = dy.stride(0);
    const int64_t sx = x.stride(0);
    const bool vec = N % V == 0 && (M == 1 || (sx % V == 0 && sdy % V == 0)) && is_aligned(dyp, 16) &&
                     is_aligned(xp, 16) && is_aligned(dxp, 16) && (bp == nullptr || is_aligned(bp, 16));
    const Tile tile = pick_tile(vec ? N / V : N);
    const dim3 block(tile.bx, tile.by);
    const int64_t step = static_cast<int64_t>(tile.by) * kUnroll;
    const size_t smem = (bp != nullptr && tile.by > 1)
                            ? static_cast<size_t>(tile.bx) * tile.by * (vec ? V : 1) * sizeof(A)
                            : 0;
    const int sms = num_sms(x.device().index());

    with_variant<V>(vec, tanh, [&](auto v, auto t) {
      auto kernel = bias_gelu_bwd_kernel<scalar_t, decltype(v)::value, decltype(t)::value>;
      // Row chunks: one full wave of blocks (no tail wave), but never more chunks than row steps.
      // Fewer chunks also keep the fp32 partial buffer small (chunks x N).
      const int per_sm = blocks_per_sm(kernel, tile.bx * tile.by, smem, x.device().index());
      const int64_t wave = static_cast<int64_t>(per_sm) * sms;
      int64_t chunks = std::max<int64_t>(1, wave / tile.col_blocks);
      chunks = std::min({chunks, ceil_div<int64_t>(M, step), static_cast<int64_t>(kMaxGridY)});
      const int64_t rows_per_chunk = round_up<int64_t>(ceil_div<int64_t>(M, chunks), step);
      chunks = ceil_div<int64_t>(M, rows_per_chunk);  // <= the chunks above: no empty chunk

      at::Tensor partial;
      if (bp != nullptr) partial = at::empty({chunks, N}, x.options().dtype(c10::CppTypeToScalarType<A>::value));
      A* pp = bp != nullptr ? partial.mutable_data_ptr<A>() : nullptr;

      launch(kernel, grid_of(tile.col_blocks, chunks), block, smem, scope.stream(), dyp, xp, bp, dxp, pp, M, N, sdy,
             sx, rows_per_chunk);
      if (bp != nullptr) {
        column_sum<scalar_t, A>(pp, dbias.mutable_data_ptr<scalar_t>(), chunks, N, scope.stream());
      }
      // `partial` is freed here while the kernels may still run: safe, the caching allocator only
      // reuses the block for work queued later on this same stream.
    });
  });
  return {dx, dbias};
}

}  // namespace
}  // namespace bertkern

TORCH_LIBRARY_FRAGMENT(BERTKERN_OPS, m) {
  m.def("bias_gelu_fwd(Tensor x, Tensor? bias, str approximate) -> Tensor");
  m.def("bias_gelu_bwd(Tensor dy, Tensor x, Tensor? bias, str approximate) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(BERTKERN_OPS, BERTKERN_DEVICE, m) {
  m.impl("bias_gelu_fwd", &bertkern::bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &bertkern::bias_gelu_bwd);
}
