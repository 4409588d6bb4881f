"""The dropout keep flags every Triton kernel draws: bertkern.reference.dropout_keep_mask is the spec.
Element (row, col) is kept when 16-bit half col % 2 (low first) of word (col % 8) // 2 of
Philox4x32-10 at counter (col // 8, row, 0, 0) under key (seed low, seed high) is >= threshold, so one
Philox call (10 rounds: most of a dropout kernel's instructions) serves 8 elements. The seed is read
from a device tensor (CUDA-graph safe), so a backward regenerates its forward's mask exactly, and the
torch and CUDA backends draw the same one.
"""
import triton
import triton.language as tl


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors (Salmon et al., SC'11), as tl.randint4x, without its 64-bit
    offset arithmetic."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def dropout_keep(SEED, rows, col_start, thresh, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """[ROWS, BLOCK_N] keep flags of columns col_start + [0, BLOCK_N) of `rows` (col_start % 8 == 0,
    BLOCK_N >= 8); SEED points to the int64 seed."""
    seed = tl.load(SEED).to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    zero = tl.zeros([ROWS, BLOCK_N // 8], dtype=tl.uint32)
    c0 = (col_start // 8 + tl.arange(0, BLOCK_N // 8)).to(tl.uint32)[None, :] + zero
    c1 = rows.to(tl.uint32)[:, None] + zero  # the low 32 bits
    r0, r1, r2, r3 = _philox(c0, c1, zero, zero, k0, k1)
    # column 4 i + j of `words` is word j of counter i; column 2 w + h of the result is half h of word w
    words = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    halves = tl.interleave(words & 0xFFFF, words >> 16)
    return halves.to(tl.int32) >= thresh
