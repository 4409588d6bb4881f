// Dropout bits shared by every bertkern CUDA op (csrc/*.cu), so that all ops and backends draw the
// same mask from the same seed.
//
// Counter-based Philox4x32-10 (Salmon et al. 2011; the curand / Triton generator), and
// bertkern.reference.dropout_keep_mask is the spec: element (row, col) of a dropout mask is kept when
// 16-bit half col % 2 (low first) of word (col % 8) / 2 of philox(counter = (col / 8, row mod 2^32,
// 0, 0), key = (seed lo, seed hi)) is >= threshold = floor(p * 2^16) (2^16 drops everything): one
// call per 8 elements. Kept values are scaled by 1 / (1 - p). The seed is read from a one-element
// int64 device tensor: no host sync, and a CUDA graph replays with whatever seed tensor it captured.
// A backward regenerates its forward's mask.
#pragma once

#include "common.cuh"

#include <algorithm>
#include <cmath>
#include <optional>

namespace bertkern {

// Written out (not curand) so that the host can run it too; same rounds and constants as
// curand_Philox4x32_10 and triton.language.philox.
__host__ __device__ __forceinline__ uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

__host__ __device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(0xD2511F53u, c.x, &hi0);
    const uint32_t lo1 = mulhilo32(0xCD9E8D57u, c.z, &hi1);
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    k.x += 0x9E3779B9u;
    k.y += 0xBB67AE85u;
  }
  return c;
}

__host__ __device__ __forceinline__ uint32_t word_of(const uint4& r, int j) {
  return j == 0 ? r.x : j == 1 ? r.y : j == 2 ? r.z : r.w;
}

// The keep bits of the two elements of word w (bit 0: its low half, the even column).
__host__ __device__ __forceinline__ uint32_t keep2(uint32_t w, uint32_t thresh) {
  return static_cast<uint32_t>((w & 0xFFFFu) >= thresh) | (static_cast<uint32_t>((w >> 16) >= thresh) << 1);
}

// The keep bits of the 8 elements of one Philox call, bit x for column 8 c + x.
__host__ __device__ __forceinline__ uint32_t keep8(const uint4& r, uint32_t thresh) {
  return keep2(r.x, thresh) | (keep2(r.y, thresh) << 2) | (keep2(r.z, thresh) << 4) | (keep2(r.w, thresh) << 6);
}

struct Dropout {
  uint2 key;        // (seed lo, seed hi)
  uint32_t thresh;  // keep iff the element's 16-bit half >= thresh
  bool on;
};

// seed == nullptr: dropout off.
__device__ __forceinline__ Dropout make_dropout(const int64_t* seed, uint32_t thresh) {
  Dropout d{make_uint2(0u, 0u), thresh, seed != nullptr};
  if (d.on) {
    const uint64_t s = static_cast<uint64_t>(*seed);
    d.key = make_uint2(static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
  }
  return d;
}

// The Philox call that holds columns 8 c .. 8 c + 7 of `row` (both mod 2^32, as in the counter:
// 32-bit arguments spare a kernel the registers of 64-bit ones).
__host__ __device__ __forceinline__ uint4 philox_of(const Dropout& d, uint32_t row, uint32_t c) {
  return philox4x32_10(make_uint4(c, row, 0u, 0u), d.key);
}

// The keep bits of that call's 8 columns, bit x for column 8 c + x.
__host__ __device__ __forceinline__ uint32_t keep8_at(const Dropout& d, uint32_t row, uint32_t c) {
  return keep8(philox_of(d, row, c), d.thresh);
}

// Keep flags of elements [col, col + V) of `row`, bit j for element col + j. With col % V == 0 and
// V % 8 == 0 each Philox call serves 8 columns, with V == 4 half a call; other V (scalar paths) make
// one call per element.
template <int V>
__host__ __device__ __forceinline__ uint32_t keep_bits(const Dropout& d, int64_t row, int64_t col) {
  uint32_t bits = 0;
  if constexpr (V % 8 == 0) {
#pragma unroll
    for (int g = 0; g < V / 8; ++g) bits |= keep8_at(d, row, col / 8 + g) << (8 * g);
  } else if constexpr (V == 4) {
    const uint4 r = philox_of(d, row, col / 8);
    bits = (col & 4) ? keep2(r.z, d.thresh) | (keep2(r.w, d.thresh) << 2)
                     : keep2(r.x, d.thresh) | (keep2(r.y, d.thresh) << 2);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t c = col + j;
      const uint32_t w = word_of(philox_of(d, row, c >> 3), static_cast<int>((c & 7) >> 1));
      bits |= static_cast<uint32_t>(((w >> (16 * (c & 1))) & 0xFFFFu) >= d.thresh) << j;
    }
  }
  return bits;
}

// ------------------------------------------------------------------ host side
inline uint32_t dropout_threshold(double p) {  // bertkern.reference.dropout_threshold
  return static_cast<uint32_t>(std::min<double>(std::floor(p * 65536.0), 65536.0));
}

inline double dropout_scale(double p) { return p >= 1.0 ? 0.0 : 1.0 / (1.0 - p); }

// The seed tensor when dropout is on (dropout_p > 0), an undefined tensor when it is off; a missing
// or malformed seed with dropout on is an error naming `op`, never a silently skipped dropout.
inline at::Tensor checked_seed(const char* op, const std::optional<at::Tensor>& seed, double dropout_p,
                               const at::Tensor& ref) {
  BK_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, op, ": dropout_p must be in [0, 1], got ", dropout_p);
  if (dropout_p == 0.0) return at::Tensor();
  BK_CHECK(seed.has_value() && seed->defined(), op, ": dropout_p > 0 needs a seed tensor");
  BK_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1, op,
              ": seed must be a one-element int64 tensor, got ", seed->scalar_type(), " of shape ",
              shape_str(seed->sizes()));
  BK_CHECK(seed->device() == ref.device(), op, ": seed is on ", seed->device(), " but the input is on ",
              ref.device());
  return *seed;
}

}  // namespace bertkern
