// Dropout bits shared by every bertkern CUDA op (csrc/*.cu), so that all ops and backends draw the
// same mask from the same seed.
//
// Counter-based Philox4x32-10 (Salmon et al. 2011; the curand / Triton generator, and
// bertkern.reference.philox_words is the spec): element (row, col) of a dropout mask is kept when
// word col % 4 of philox(counter = (col / 4, row mod 2^32, 0, 0), key = (seed lo, seed hi)), shifted
// right by 1, is >= threshold = floor(p * 2^31) (2^31 drops everything). Kept values are scaled by
// 1 / (1 - p). The seed is read from a one-element int64 device tensor: no host sync, and a CUDA
// graph replays with whatever seed tensor it captured. A backward regenerates its forward's mask.
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

struct Dropout {
  uint2 key;        // (seed lo, seed hi)
  uint32_t thresh;  // keep iff (word >> 1) >= thresh
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

// Keep flags of elements [col, col + V) of `row`, bit j for element col + j. With col % 4 == 0 and
// V % 4 == 0 each Philox call serves 4 columns; other V (scalar paths) pick one word per element.
template <int V>
__host__ __device__ __forceinline__ uint32_t keep_bits(const Dropout& d, int64_t row, int64_t col) {
  const uint32_t r32 = static_cast<uint32_t>(row);
  uint32_t bits = 0;
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int g = 0; g < V / 4; ++g) {
      const uint4 r = philox4x32_10(make_uint4(static_cast<uint32_t>(col / 4 + g), r32, 0u, 0u), d.key);
      bits |= static_cast<uint32_t>((r.x >> 1) >= d.thresh) << (4 * g + 0);
      bits |= static_cast<uint32_t>((r.y >> 1) >= d.thresh) << (4 * g + 1);
      bits |= static_cast<uint32_t>((r.z >> 1) >= d.thresh) << (4 * g + 2);
      bits |= static_cast<uint32_t>((r.w >> 1) >= d.thresh) << (4 * g + 3);
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t c = col + j;
      const uint4 r = philox4x32_10(make_uint4(static_cast<uint32_t>(c >> 2), r32, 0u, 0u), d.key);
      bits |= static_cast<uint32_t>((word_of(r, static_cast<int>(c & 3)) >> 1) >= d.thresh) << j;
    }
  }
  return bits;
}

// ------------------------------------------------------------------ host side
inline uint32_t dropout_threshold(double p) {  // bertkern.reference.dropout_threshold
  return static_cast<uint32_t>(std::min<double>(std::floor(p * 2147483648.0), 2147483648.0));
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
