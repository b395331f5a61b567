"""xnor_gemm / and_gemm: exact equality with integer references on every backend."""
import pytest
import torch

from gdnsq_kernels import and_gemm, pack_bits, xnor_gemm
from gdnsq_kernels.binary import _dispatch as binary_dispatch
from gdnsq_kernels.binary import numpy_gemm, reference as binary_reference
from gdnsq_kernels.backend import triton_interpreter_enabled

CUDA = torch.cuda.is_available()
# The interpreter runs Triton on CPU tensors; conftest enables it on machines without CUDA.
INTERP = triton_interpreter_enabled()
TRITON_DEVICES = (["cpu"] if INTERP else []) + (["cuda"] if CUDA else [])
# (device, backend): every backend that runs on the device; 'triton' on CPU is the interpreter.
CASES = [("cpu", b) for b in ("reference", "cpu", "torch") + (("triton",) if INTERP else ())]
if CUDA:
    CASES += [("cuda", b) for b in ("reference", "torch", "triton")]
IDS = [f"{d}-{b}" for d, b in CASES]


def _int_ref(x, y):
    """Integer oracle from the unpacked 0/1 matrices: (xnor, and) as int64."""
    x = x.to(torch.int64).cpu()
    y = y.to(torch.int64).cpu()
    return (2 * x - 1) @ (2 * y - 1).T, x @ y.T


@pytest.mark.parametrize("device,backend", CASES, ids=IDS)
@pytest.mark.parametrize("M,N,K", [(5, 7, 1), (5, 7, 31), (5, 7, 32), (5, 7, 33), (3, 4, 1000), (1, 9, 65), (6, 1, 40), (1, 1, 33)])
def test_gemm_exact(device, backend, M, N, K, poison_empty):
    x = torch.randint(0, 2, (M, K), device=device)
    y = torch.randint(0, 2, (N, K), device=device)
    if M > 2:
        x[0] = 0  # all-zero and all-one rows
        x[1] = 1
    if N > 2:
        y[0] = 1
        y[-1] = 0
    a, b = pack_bits(x), pack_bits(y)
    ref_x, ref_a = _int_ref(x, y)
    cx = xnor_gemm(a, b, K, backend=backend)
    ca = and_gemm(a, b, K, backend=backend)
    assert cx.dtype == torch.int32 and ca.dtype == torch.int32
    assert cx.device.type == device and cx.shape == (M, N)
    assert torch.equal(cx.cpu().to(torch.int64), ref_x)
    assert torch.equal(ca.cpu().to(torch.int64), ref_a)


@pytest.mark.parametrize("device,backend", CASES, ids=IDS)
def test_padding_bits_never_count(device, backend):
    K = 45
    x = torch.randint(0, 2, (4, K), device=device)
    y = torch.randint(0, 2, (3, K), device=device)
    a, b = pack_bits(x), pack_bits(y)
    # Garbage in the 19 bits past k of the last word (including the sign bit).
    a_dirty, b_dirty = a.clone(), b.clone()
    a_dirty[:, -1] |= torch.tensor(-(1 << 13), dtype=torch.int32)
    b_dirty[1:, -1] |= torch.tensor(-(1 << 20), dtype=torch.int32)
    assert torch.equal(xnor_gemm(a_dirty, b_dirty, K, backend=backend), xnor_gemm(a, b, K, backend=backend))
    assert torch.equal(and_gemm(a_dirty, b_dirty, K, backend=backend), and_gemm(a, b, K, backend=backend))
    ref_x, ref_a = _int_ref(x, y)
    assert torch.equal(and_gemm(a_dirty, b_dirty, K, backend=backend).cpu().to(torch.int64), ref_a)


def test_xnor_and_identity():
    """sum (2a-1)(2b-1) = 4 sum ab - 2 sum a - 2 sum b + k (METHOD.md Part B §7)."""
    K = 77
    x = torch.randint(0, 2, (6, K))
    y = torch.randint(0, 2, (5, K))
    a, b = pack_bits(x), pack_bits(y)
    lhs = xnor_gemm(a, b, K)
    rhs = 4 * and_gemm(a, b, K) - 2 * x.sum(1, keepdim=True) - 2 * y.sum(1)[None] + K
    assert torch.equal(lhs.to(torch.int64), rhs)


@pytest.mark.parametrize("M,N,K", [(70, 9, 100), (3, 5, 1000), (65, 1, 33), (37, 130, 64), (1, 70, 2000)])
def test_cpu_paths_agree(M, N, K):
    """Every CPU strategy (C++ popcount, NumPy popcount, float sgemm of unpacked codes) is exact."""
    from gdnsq_kernels.binary import cpu_xnor

    x = torch.randint(0, 2, (M, K))
    y = torch.randint(0, 2, (N, K))
    a, b = pack_bits(x), pack_bits(y)
    ref_x, ref_a = _int_ref(x, y)
    for xnor, ref in ((True, ref_x), (False, ref_a)):
        assert torch.equal(numpy_gemm.gemm_cpu_popcount(a, b, K, xnor).to(torch.int64), ref)
        assert torch.equal(numpy_gemm.gemm_cpu_float(a, b, K, xnor).to(torch.int64), ref)
        if cpu_xnor.available():
            assert torch.equal(cpu_xnor.packed_gemm_cpp(a, b, K, xnor).to(torch.int64), ref)


def test_cpp_gemm_builds():
    """The C++ popcount GEMM is the cpu backend wherever a compiler exists (it does in CI)."""
    import shutil

    from gdnsq_kernels.binary import cpu_xnor

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the cpu backend uses NumPy popcount")
    assert cpu_xnor.available(), cpu_xnor.EXTENSION.describe()[1]


def test_cpp_gemm_build_failure_raises_when_required_else_falls_back(monkeypatch):
    from gdnsq_kernels.binary import cpu_xnor

    from gdnsq_kernels._build import Extension

    def broken(spec):
        raise RuntimeError("no compiler here")

    ext = cpu_xnor.EXTENSION
    monkeypatch.setattr(cpu_xnor, "EXTENSION", Extension(ext.label, ext.fallback, ext.spec, build=broken))
    monkeypatch.delenv("GDNSQ_NO_CPP_XNOR", raising=False)
    monkeypatch.setenv("GDNSQ_REQUIRE_CPP", "1")  # the suite's setting: no silent fallback
    with pytest.raises(RuntimeError, match="no compiler here"):
        cpu_xnor.available()
    monkeypatch.setenv("GDNSQ_REQUIRE_CPP", "0")
    with pytest.warns(RuntimeWarning, match="NumPy popcount"):
        assert cpu_xnor.available() is False


@pytest.mark.parametrize("M,N,K", [(5, 7, 33), (70, 9, 100), (1, 130, 1000)])
def test_cpu_backend_without_cpp(monkeypatch, M, N, K):
    """The NumPy / float fallback of the cpu backend (no compiler) through the public op."""
    monkeypatch.setattr(binary_dispatch, "cpp_gemm_available", lambda: False)
    x = torch.randint(0, 2, (M, K))
    y = torch.randint(0, 2, (N, K))
    ref_x, ref_a = _int_ref(x, y)
    assert torch.equal(xnor_gemm(pack_bits(x), pack_bits(y), K, backend="cpu").to(torch.int64), ref_x)
    assert torch.equal(and_gemm(pack_bits(x), pack_bits(y), K, backend="cpu").to(torch.int64), ref_a)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("xnor", [True, False])
def test_triton_multi_tile_and_word_loop(device, xnor, poison_empty):
    """Small forced blocks: several M/N tiles with ragged edges and several word-loop steps."""
    from gdnsq_kernels.binary.triton_xnor import packed_gemm_triton

    M, N, K = 5, 7, 161  # 6 words: 3 loop steps of 2 words, ragged last tile in M and N
    x = torch.randint(0, 2, (M, K), device=device)
    y = torch.randint(0, 2, (N, K), device=device)
    out = packed_gemm_triton(pack_bits(x), pack_bits(y), K, xnor, blocks=(2, 4, 2))
    ref_x, ref_a = _int_ref(x, y)
    assert torch.equal(out.cpu().to(torch.int64), ref_x if xnor else ref_a)


def test_reference_is_the_default_backend_semantics(monkeypatch):
    x = torch.randint(0, 2, (4, 50))
    y = torch.randint(0, 2, (3, 50))
    a, b = pack_bits(x), pack_bits(y)
    monkeypatch.setenv("GDNSQ_BACKEND", "reference")
    r = xnor_gemm(a, b, 50)
    monkeypatch.setenv("GDNSQ_BACKEND", "cpu")
    assert torch.equal(xnor_gemm(a, b, 50), r)
    assert torch.equal(r, binary_reference.xnor_gemm_reference(a, b, 50))


def test_empty_and_k0():
    a = torch.zeros((0, 2), dtype=torch.int32)
    b = torch.zeros((3, 2), dtype=torch.int32)
    assert xnor_gemm(a, b, 40).shape == (0, 3)
    z = torch.zeros((2, 0), dtype=torch.int32)
    assert torch.equal(xnor_gemm(z, z, 0), torch.zeros(2, 2, dtype=torch.int32))


def test_errors():
    a = torch.zeros((2, 2), dtype=torch.int32)
    b3 = torch.zeros((3, 3), dtype=torch.int32)
    with pytest.raises(ValueError, match="b_packed has 3 words per row but a_packed has 2"):
        xnor_gemm(a, b3, 40)
    with pytest.raises(ValueError, match="k=65 is larger than the packed width"):
        xnor_gemm(a, a, 65)
    with pytest.raises(ValueError, match="k=20 needs"):
        and_gemm(a, a, 20)
    with pytest.raises(TypeError, match="a_packed must be an int32"):
        xnor_gemm(a.float(), a, 40)
    with pytest.raises(TypeError, match="b_packed must be an int32"):
        and_gemm(a, a.to(torch.float64), 40)
    with pytest.raises(ValueError, match="a_packed must be 2-D"):
        xnor_gemm(a[0], a, 40)
    with pytest.raises(TypeError, match="k must be an int"):
        xnor_gemm(a, a, 40.0)
    with pytest.raises(ValueError, match="GDNSQ_BACKEND/backend"):
        xnor_gemm(a, a, 40, backend="nope")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("M", [1, 3, 8, 15, 16, 100])
def test_triton_gpu_block_sizes(device, M, poison_empty):
    """The path and tiles the GPU table picks for small and large M (run here by the interpreter)."""
    from gdnsq_kernels.binary.triton_xnor import DOT_MIN_M, _config, packed_gemm_triton

    N, K = 70, 300  # W = 10 words: not a multiple of any BLOCK_W, ragged N tiles
    cfg = _config(M, N, (K + 31) // 32, interpret=False)
    assert cfg.path == ("dot" if M >= DOT_MIN_M else "popcount")
    x = torch.randint(0, 2, (M, K), device=device)
    y = torch.randint(0, 2, (N, K), device=device)
    ref_x, ref_a = _int_ref(x, y)
    for xnor, ref in ((True, ref_x), (False, ref_a)):
        out = packed_gemm_triton(pack_bits(x), pack_bits(y), K, xnor, path=cfg.path,
                                 blocks=(cfg.block_m, cfg.block_n, cfg.block_w))
        assert torch.equal(out.cpu().to(torch.int64), ref)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("M,N,K,blocks", [
    (150, 40, 161, (16, 16, 1)),   # 10 M tiles > GROUP_M=8: a partial last group; 6 K steps
    (17, 33, 33, (16, 32, 2)),     # one row past a tile, k just past a word
    (64, 16, 1000, (32, 16, 4)),   # k % 32 = 8 with a 4-word step: ragged last step
    (20, 3, 1, (16, 16, 1)),       # k = 1, N smaller than the tile
])
def test_triton_tensor_core_path_exact(device, M, N, K, blocks, poison_empty):
    """The int8 tl.dot path against binary_reference, with dirty padding bits past k."""
    from gdnsq_kernels.binary.triton_xnor import packed_gemm_triton

    x = torch.randint(0, 2, (M, K), device=device)
    y = torch.randint(0, 2, (N, K), device=device)
    x[0] = 1  # an all-ones row: every valid bit set
    a, b = pack_bits(x), pack_bits(y)
    if K % 32:
        a[:, -1] |= torch.tensor(-(1 << (K % 32)), dtype=torch.int32)  # garbage past k
        b[::2, -1] |= torch.tensor(-(1 << (K % 32)), dtype=torch.int32)
    for xnor, ref_fn in ((True, binary_reference.xnor_gemm_reference),
                         (False, binary_reference.and_gemm_reference)):
        out = packed_gemm_triton(a, b, K, xnor, path="dot", blocks=blocks)
        assert torch.equal(out.cpu(), ref_fn(a.cpu(), b.cpu(), K))


def test_gemm_grid_is_one_axis_for_conv_sized_problems():
    """A conv GEMM puts N*Ho*Wo patches on the N side: at 56x56 maps and batch 1,400 that is
    4.4M columns, far past the 65,535 blocks CUDA allows on grid axes 1 and 2."""
    from gdnsq_kernels.binary.triton_xnor import _config, _grid

    M, N, W = 65, 1400 * 56 * 56, 18
    cfg = _config(M, N, W, interpret=False)
    grid = _grid(M, N, cfg.block_m, cfg.block_n)
    assert len(grid) == 1 and grid[0] < 2**31
    assert grid[0] == -(-M // cfg.block_m) * -(-N // cfg.block_n)


def test_gemm_tile_order_covers_every_tile_once():
    """The grouped 1-D tile order of _tile_ids (re-derived here in Python) is a bijection."""
    from gdnsq_kernels.binary.triton_xnor import GROUP_M

    for num_m, num_n in ((1, 1), (3, 5), (10, 3), (17, 4), (8, 8)):
        seen = set()
        for pid in range(num_m * num_n):
            per_group = GROUP_M * num_n
            first_m = (pid // per_group) * GROUP_M
            rows = min(num_m - first_m, GROUP_M)
            seen.add((first_m + (pid % per_group) % rows, (pid % per_group) // rows))
        assert seen == {(m, n) for m in range(num_m) for n in range(num_n)}


def test_cpp_gemm_entry_points_check_device_and_k():
    """The C++ kernels refuse what the Python wrappers never pass (a last line of defence): a
    tensor off the CPU, and a k that does not match the words (int32(2**32 + 32) would be 32);
    the public op refuses a k beyond the int32 range of its result."""
    from gdnsq_kernels.binary import cpu_xnor

    ext = cpu_xnor.load_extension()
    a = torch.zeros(2, 1, dtype=torch.int32)
    assert ext.packed_gemm(a, a, 32, True).tolist() == [[32, 32], [32, 32]]
    with pytest.raises(ValueError, match="packed_gemm: a must be a CPU tensor"):
        ext.packed_gemm(a.to("meta"), a, 32, True)
    with pytest.raises(ValueError, match="k=4294967328 does not match 1 words per row"):
        ext.packed_gemm(a, a, 2**32 + 32, True)
    kj = torch.zeros(1, 3, 2, dtype=torch.int32)
    f64 = dict(dtype=torch.float64)
    with pytest.raises(ValueError, match="conv_epilogue: kj must be a CPU tensor"):
        ext.conv_epilogue(kj.to("meta"), torch.zeros(3, **f64), torch.zeros(1, **f64), torch.zeros(1, **f64))
    with pytest.raises(ValueError, match="linear_epilogue: jsum must be a CPU tensor"):
        ext.linear_epilogue(kj[0], torch.zeros(3, dtype=torch.int32, device="meta"), torch.zeros(2, **f64),
                            torch.zeros(2, **f64), torch.zeros(2, **f64))
    wide = torch.zeros(1, 1, dtype=torch.int32).expand(1, 2**26)  # 2**31 bits, no memory
    with pytest.raises(ValueError, match=r"k=2147483648 exceeds 2147483647, the int32 range"):
        xnor_gemm(wide, wide, 2**31)
