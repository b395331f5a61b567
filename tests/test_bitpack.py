"""pack_bits / unpack_bits: bit order, zero padding, round trips along any dim, errors."""
import pytest
import torch

from gdnsq_kernels import pack_bits, unpack_bits
from gdnsq_kernels.binary import bitpack

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _pack_loop(bits_1d):
    """Independent oracle: Python-int packing of one row, LSB first, as int32 patterns."""
    k = len(bits_1d)
    words = []
    for w in range((k + 31) // 32):
        v = 0
        for i in range(32):
            idx = 32 * w + i
            if idx < k and int(bits_1d[idx]):
                v |= 1 << i
        words.append(v - (1 << 32) if v >= (1 << 31) else v)
    return words


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 31, 32, 33, 64, 100])
def test_bit_order_matches_python_loop(device, k, poison_empty):
    bits = torch.randint(0, 2, (3, k), device=device)
    bits[0] = 1  # all-ones row sets the sign bit of full words
    bits[1] = 0
    packed = pack_bits(bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, (k + 31) // 32)
    for r in range(3):
        assert packed[r].tolist() == _pack_loop(bits[r].tolist())


def test_known_values():
    assert pack_bits(torch.tensor([1, 0, 1, 1])).tolist() == [13]
    e31 = torch.zeros(33, dtype=torch.bool)
    e31[31] = True
    e31[32] = True
    assert pack_bits(e31).tolist() == [-(2 ** 31), 1]
    assert pack_bits(torch.ones(33, dtype=torch.uint8)).tolist() == [-1, 1]  # padding bits are 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dim", [((5, 7, 33), -1), ((5, 70, 3), 1), ((65, 2, 3), 0), ((2, 3, 4, 32), 3), ((1,), 0), ((4, 0, 3), 1)])
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64])
def test_round_trip_any_dim(device, shape, dim, dtype, poison_empty):
    bits = torch.randint(0, 2, shape, device=device).to(dtype)
    packed = pack_bits(bits, dim=dim)
    expect = list(shape)
    expect[dim] = (shape[dim] + 31) // 32
    assert list(packed.shape) == expect
    out = unpack_bits(packed, shape[dim], dim=dim)
    assert out.dtype == torch.uint8 and out.shape == bits.shape
    assert torch.equal(out, bits.to(torch.uint8))


def test_numpy_and_torch_pack_paths_agree():
    bits = torch.randint(0, 2, (17, 97))
    assert torch.equal(bitpack._pack_last_numpy(bits, 4), bitpack._pack_last_torch(bits, 4))


def test_unpack_ignores_bits_past_k():
    packed = torch.tensor([[-1, -1]], dtype=torch.int32)
    assert unpack_bits(packed, 40).tolist() == [[1] * 40]


def test_errors():
    with pytest.raises(TypeError, match="bits"):
        pack_bits(torch.rand(4))
    with pytest.raises(ValueError, match="bits must contain only 0 and 1"):
        pack_bits(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="dim"):
        pack_bits(torch.ones(3, dtype=torch.bool), dim=2)
    with pytest.raises(ValueError, match="k=65 is larger than the packed width"):
        unpack_bits(torch.zeros(2, 2, dtype=torch.int32), 65)
    with pytest.raises(ValueError, match="k=10 needs"):
        unpack_bits(torch.zeros(2, 2, dtype=torch.int32), 10)
    with pytest.raises(TypeError, match="packed must be an int32"):
        unpack_bits(torch.zeros(2, 2, dtype=torch.int64), 40)
    with pytest.raises(TypeError, match="k must be an int"):
        unpack_bits(torch.zeros(2, 2, dtype=torch.int32), 40.0)


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_code_is_a_value_error_naming_it(device):
    """A code outside {0, 1} raises a ValueError at the call (on CUDA too: no device-side
    assert, which would leave the CUDA context unusable) naming the argument, the value and
    where it is."""
    from gdnsq_kernels.binary import binary_conv2d, pack_conv_weight

    with pytest.raises(ValueError, match=r"^bits must contain only 0 and 1, got 3 at index \(1, 0\)$"):
        pack_bits(torch.tensor([[0, 1], [3, 1]], device=device))
    with pytest.raises(ValueError, match=r"bits must contain only 0 and 1, got -1 at index \(2,\)"):
        pack_bits(torch.tensor([1, 0, -1], dtype=torch.int8, device=device))
    k = torch.randint(0, 2, (4, 3, 3, 3), device=device)
    k[2, 1, 0, 2] = 5
    with pytest.raises(ValueError, match=r"weight_codes must contain only 0 and 1, got 5 at index \(2, 1, 0, 2\)"):
        pack_conv_weight(k, 0.1, -0.05)
    pw = pack_conv_weight(k.clamp(0, 1), 0.1, -0.05)
    j = torch.randint(0, 2, (1, 3, 5, 5), device=device, dtype=torch.uint8)
    j[0, 0, 4, 4] = 2
    with pytest.raises(ValueError, match=r"act_codes must contain only 0 and 1, got 2 at index \(0, 0, 4, 4\)"):
        binary_conv2d(j, 0.5, 0.0, pw)
    # the process (and its CUDA context) is still usable
    assert binary_conv2d(j.clamp(0, 1), 0.5, 0.0, pw).shape == (1, 4, 3, 3)


def test_library_codes_skip_the_value_check(monkeypatch):
    """The value check (a host read: a sync on CUDA) runs once per user-facing tensor of codes
    and never for codes the library made itself (the deployed layers' bit planes and 0/1
    activations), which pass check=False."""
    from _deploy_helpers import make_qmodel
    from gdnsq.deploy import freeze
    from gdnsq_kernels.binary import binary_conv2d

    checked = []
    real = bitpack._check_values
    monkeypatch.setattr(bitpack, "_check_values", lambda bits, name: (checked.append(name), real(bits, name)))
    pack_bits(torch.randint(0, 2, (3, 40)))
    assert checked == ["bits"]
    checked.clear()
    j = torch.randint(0, 2, (1, 3, 5, 5))
    binary_conv2d(j, 0.5, 0.0, torch.randint(0, 2, (4, 3, 3, 3)), 0.1, -0.05)
    assert checked == ["act_codes", "weight_codes"]  # the weight is not checked again when packed
    checked.clear()
    binary_conv2d(j, 0.5, 0.0, torch.randint(0, 2, (4, 3, 3, 3)), 0.1, -0.05, check=False)
    assert checked == []
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        for bits, path in ((1, "binary"), (2, "bitplane")):
            frozen = freeze(make_qmodel(bits, bits), path=path)
            assert {m.path for m in frozen.modules() if hasattr(m, "set_path")} == {path}
            frozen(x)
    assert checked == []
