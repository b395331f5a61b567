"""Triton packed-bit GEMMs: ``C = k - 2*popcount(A XOR B)`` (XNOR form) or ``popcount(A AND B)``.

Two kernels, chosen per shape by ``_config`` (a small table, see there):

* **popcount** (``_packed_gemm_kernel``; small M, e.g. batch-1 inference): memory bound on the
  packed weight, which it reads once. One program computes a (BLOCK_M, BLOCK_N) tile and loops
  over the packed words BLOCK_W at a time, popcounting the (BLOCK_M, BLOCK_N, BLOCK_W) tile of
  XOR/AND words. Compiled for an NVIDIA GPU it uses the hardware ``popc.b32`` through inline
  PTX; under ``TRITON_INTERPRET=1`` (and on non-NVIDIA targets) an integer SWAR bit trick.
* **tensor cores** (``_bits_dot_kernel``; M >= 16): each BLOCK_W-word chunk of A and B is
  unpacked in registers to int8 and multiplied with ``tl.dot`` (int8 x int8 -> int32, exact;
  ``mma``/``wgmma ... s32.s8.s8`` on sm_80/sm_90). AND uses the 0/1 codes; XNOR the +-1 codes
  ``2b - 1``, zeroed past ``k``, so the dot is ``sum (2a-1)(2b-1)`` itself.

Both mask bits past ``k`` (the last word's ``k % 32`` valid bits; words past W load as 0), so
padding never counts even if the caller's padding bits are not zero.

Grid: one axis, tiles in grouped order (GROUP_M row tiles share each column tile, for L2
reuse). CUDA caps grid axes 1 and 2 at 65,535 blocks; a conv's N*Ho*Wo patches on axis 1
would fail at 56x56 maps from batch ~1,338, axis 0 allows 2**31 - 1.
"""
from __future__ import annotations

import re
import warnings
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._launch import contiguous, launch, targets_cuda
from .bitpack import tail_mask

# Smallest M that takes the tensor-core path (tl.dot needs M tiles of >= 16 rows).
DOT_MIN_M = 16
GROUP_M = 8


@triton.jit
def _popcount32(x, HW_POPC: tl.constexpr):
    """Per-element popcount of int32 bit patterns (result 0..32, int32)."""
    if HW_POPC:
        return tl.inline_asm_elementwise(
            "popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        # SWAR: 2-bit, 4-bit, 8-bit partial counts. Each arithmetic right shift is masked, so
        # the sign bit of int32 never leaks in; the wrapped subtraction is exact mod 2**32.
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F  # non-negative from here on
        x = x + (x >> 8)
        x = x + (x >> 16)
        return x & 0x3F


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """(pid_m, pid_n) of this program in a 1-D grid of cdiv(M)*cdiv(N) tiles, grouped order."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * num_n
    first_m = (pid // per_group) * GROUP
    group_rows = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _tile_rows(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """(rows of A, rows of B) of this program's (BLOCK_M, BLOCK_N) output tile."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP)
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _load_words(ptr, rows, stride, rw, R, W):
    """(len(rows), len(rw)) int32 words ``ptr[rows, rw]`` of a row-major packed matrix with
    ``R`` rows of ``W`` words (row stride ``stride``); 0 outside it."""
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride + rw[None, :],
                   mask=(rows < R)[:, None] & (rw < W)[None, :], other=0)


@triton.jit
def _load_word_pair(a_ptr, b_ptr, rm, rn, w0, stride_am, stride_bn, M, N, W, BLOCK_W: tl.constexpr):
    """(word indices rw, A words (len(rm), BLOCK_W), B words (len(rn), BLOCK_W)) of the K step
    starting at word w0."""
    rw = w0 + tl.arange(0, BLOCK_W)
    return rw, _load_words(a_ptr, rm, stride_am, rw, M, W), _load_words(b_ptr, rn, stride_bn, rw, N, W)


@triton.jit
def _store_tile(c_ptr, rm, rn, stride_cm, M, N, tile):
    """Store the (len(rm), len(rn)) output tile into the (M, N) row-major C, masked."""
    tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :], tile,
             mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _packed_gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, W, k, TAIL, stride_am, stride_bn, stride_cm,
                        XNOR: tl.constexpr, HW_POPC: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, GROUP: tl.constexpr):
    """C[m, n] = popcount over the words of (a XOR b) (XNOR: k - 2*that) or of (a AND b)."""
    rm, rn = _tile_rows(M, N, BLOCK_M, BLOCK_N, GROUP)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for w0 in range(0, W, BLOCK_W):
        rw, a, b = _load_word_pair(a_ptr, b_ptr, rm, rn, w0, stride_am, stride_bn, M, N, W, BLOCK_W)
        # Only the last word has bits past k; masking both operands makes XOR and AND ignore them.
        wmask = tl.where(rw == W - 1, TAIL, -1)
        a = a & wmask[None, :]
        b = b & wmask[None, :]
        if XNOR:
            x = a[:, None, :] ^ b[None, :, :]
        else:
            x = a[:, None, :] & b[None, :, :]
        acc += tl.sum(_popcount32(x, HW_POPC), axis=2).to(tl.int32)
    if XNOR:
        out = k - 2 * acc
    else:
        out = acc
    _store_tile(c_ptr, rm, rn, stride_cm, M, N, out)


@triton.jit
def _unpack_int8(words, col0, k, ROWS: tl.constexpr, BLOCK_W: tl.constexpr, XNOR: tl.constexpr):
    """(ROWS, BLOCK_W) int32 words -> (ROWS, 32*BLOCK_W) int8 codes, column c = bit c%32 of
    word c//32 (pack_bits order); 0/1 for AND, +-1 for XNOR; 0 at global column >= k."""
    shifts = tl.arange(0, 32)
    bits = (words[:, :, None] >> shifts[None, None, :]) & 1  # arithmetic shift, then one bit
    bits = tl.reshape(bits, (ROWS, 32 * BLOCK_W))
    if XNOR:
        cols = col0 + tl.arange(0, 32 * BLOCK_W)
        bits = tl.where(cols[None, :] < k, 2 * bits - 1, 0)
    return bits.to(tl.int8)


@triton.jit
def _bits_dot_kernel(a_ptr, b_ptr, c_ptr, M, N, W, k, TAIL, stride_am, stride_bn, stride_cm,
                     XNOR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_W: tl.constexpr, GROUP: tl.constexpr):
    """The same C from int8 tensor-core dots of the unpacked codes (+-1 for XNOR, 0/1 for AND)."""
    rm, rn = _tile_rows(M, N, BLOCK_M, BLOCK_N, GROUP)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for w0 in range(0, W, BLOCK_W):
        rw, a, b = _load_word_pair(a_ptr, b_ptr, rm, rn, w0, stride_am, stride_bn, M, N, W, BLOCK_W)
        if not XNOR:
            # AND form: bits past k cleared in the last word (words past W are 0 already).
            wmask = tl.where(rw == W - 1, TAIL, -1)
            a = a & wmask[None, :]
            b = b & wmask[None, :]
        a8 = _unpack_int8(a, w0 * 32, k, BLOCK_M, BLOCK_W, XNOR)
        b8 = _unpack_int8(b, w0 * 32, k, BLOCK_N, BLOCK_W, XNOR)
        acc = tl.dot(a8, tl.trans(b8), acc, out_dtype=tl.int32)
    _store_tile(c_ptr, rm, rn, stride_cm, M, N, acc)


class GemmConfig(NamedTuple):
    path: str          # "popcount" or "dot"
    block_m: int
    block_n: int
    block_w: int       # packed int32 words per K step (32*block_w codes)
    num_warps: int


def _config(M: int, N: int, W: int, interpret: bool) -> GemmConfig:
    """The kernel and tile sizes for an (M, N, W-word) problem: the per-shape table.

    * M < DOT_MIN_M: popcount. Memory bound on the 1-bit weight; a thin M tile and a wide
      N x W tile stream it once (M <= 4: a narrow N tile keeps enough programs in flight).
      The 3-D word tile stays at <= 64 int32 values per thread to bound register use.
    * M >= DOT_MIN_M: tensor cores. 128-code K steps (4 words); 64x64 tiles up to M = 64,
      128x128 (8 warps) beyond, where the dot is compute bound.
    Under the interpreter (each program is a Python loop step) tiles are simply large.
    """
    if M >= DOT_MIN_M:
        if interpret:
            return GemmConfig("dot", 32, 32, 2, 4)
        if M <= 64 or N <= 64:
            return GemmConfig("dot", 64, 64, 4, 4)
        return GemmConfig("dot", 128, 128, 4, 8)
    if interpret:
        return GemmConfig("popcount", min(triton.next_power_of_2(max(M, 1)), 32),
                          min(triton.next_power_of_2(max(N, 1)), 32),
                          min(triton.next_power_of_2(max(W, 1)), 32), 4)
    if M <= 4:
        bm = triton.next_power_of_2(max(M, 1))
        return GemmConfig("popcount", bm, 32, 32 // bm, 4)
    return GemmConfig("popcount", 16, 64, 4, 4)


def _grid(M: int, N: int, block_m: int, block_n: int) -> tuple:
    """1-D grid over every (M, N) tile; axis 0 takes up to 2**31 - 1 programs."""
    return (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)


# What a failed *compilation* of the inline PTX raises: Triton's front end (CompilationError),
# ptxas (PTXASError from Triton 3.2; before it a RuntimeError naming ptxas) and the MLIR/LLVM
# passes (a RuntimeError naming the pass manager or LLVM). Nothing else counts: an
# out-of-memory, a full cache disk or an interrupt propagates and the next call compiles the
# hardware popcount again, since the SWAR variant would not mend it.
try:
    from triton.runtime.errors import PTXASError as _PTXASError
except ImportError:  # Triton < 3.2
    _PTXASError = None
from triton.compiler.errors import CompilationError as _CompilationError


def is_compile_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (raised by compiling the hardware-popcount kernel) is the toolchain
    rejecting the code: deterministic for a given GPU architecture and kernel configuration."""
    if isinstance(exc, _CompilationError) or (_PTXASError is not None and isinstance(exc, _PTXASError)):
        return True
    # Triton's MLIR/LLVM passes report a rejected kernel as a plain RuntimeError.
    return isinstance(exc, RuntimeError) and re.search(r"ptxas|PassManager|LLVM ERROR", str(exc)) is not None


#: Compilations of the inline-PTX popcount that failed, by what decides them (see
#: ``_popcount_key``) -> the cause; those keys use the SWAR popcount.
HW_POPCOUNT_FAILURES: dict = {}


def _compile_target(t: torch.Tensor):
    """The GPU architecture kernels for ``t`` compile for ((major, minor); "recorded" when
    launches are recorded, not run)."""
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else "recorded"


def _popcount_key(t: torch.Tensor, meta: dict) -> tuple:
    """What decides whether the inline-PTX kernel compiles: the target, the Triton version and
    the kernel's compile-time configuration."""
    return (_compile_target(t), triton.__version__, tuple(sorted(meta.items())))


def _hw_popcount_available(t: torch.Tensor) -> bool:
    return targets_cuda(t) and torch.version.hip is None


def _launch_popcount(grid, args, meta):
    """Compile with the inline-PTX popcount (falling back to SWAR only if the toolchain rejects
    it, and then for that target and configuration only), then launch outside any ``try``:
    launch and illegal-address errors propagate."""
    hw = _hw_popcount_available(args[0])
    if hw:
        key = _popcount_key(args[0], meta)
        hw = key not in HW_POPCOUNT_FAILURES
    if hw:
        try:
            launch(_packed_gemm_kernel, grid, *args, compile_only=True, HW_POPC=True, **meta)
        except Exception as exc:
            if not is_compile_failure(exc):
                raise
            # Inline PTX is the one toolchain-specific piece; fall back to the portable bit
            # trick rather than failing inference.
            HW_POPCOUNT_FAILURES[key] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            hw = False
            warnings.warn(f"gdnsq_kernels: the hardware popcount (inline PTX popc.b32) failed to "
                          f"compile for {key[0]} ({HW_POPCOUNT_FAILURES[key]}); this configuration "
                          "uses the SWAR popcount", RuntimeWarning)
    launch(_packed_gemm_kernel, grid, *args, HW_POPC=hw, **meta)


def packed_gemm_triton(a_packed: torch.Tensor, b_packed: torch.Tensor, k: int, xnor: bool,
                       blocks=None, path=None) -> torch.Tensor:
    """Launch the packed GEMM. Inputs are validated int32 (M, W), (N, W); returns int32 (M, N).

    ``blocks=(BLOCK_M, BLOCK_N, BLOCK_W)`` and ``path="popcount"|"dot"`` override the table
    (tests use them to force several tiles and word-loop steps on small shapes).
    """
    a, b = contiguous(a_packed, b_packed)
    M, W = a.shape
    N = b.shape[0]
    c = torch.empty((M, N), dtype=torch.int32, device=a.device)
    if M == 0 or N == 0:
        return c
    cfg = _config(M, N, W, interpret=not targets_cuda(a))
    if path is not None:
        cfg = cfg._replace(path=path)
    if blocks is not None:
        cfg = cfg._replace(block_m=blocks[0], block_n=blocks[1], block_w=blocks[2])
    grid = _grid(M, N, cfg.block_m, cfg.block_n)
    # W == 0 (k == 0): the word loop is empty and the kernel stores k - 0 = 0.
    args = (a, b, c, M, N, W, int(k), tail_mask(int(k)), a.stride(0), b.stride(0), c.stride(0))
    meta = dict(XNOR=bool(xnor), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                BLOCK_W=cfg.block_w, GROUP=GROUP_M, num_warps=cfg.num_warps)
    if cfg.path == "dot":
        launch(_bits_dot_kernel, grid, *args, **meta)
    else:
        _launch_popcount(grid, args, meta)
    return c
