"""QMultiheadAttention: the same function as nn.MultiheadAttention, quantized projections that
train, torch's Transformer layers kept off their fused paths, and freeze."""
import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gdnsq
from gdnsq import QLinear, QMultiheadAttention
from gdnsq.deploy import freeze, load, save

E, H = 8, 2
ALL = ("q_proj", "k_proj", "v_proj", "out_proj")
Q4 = dict(weight_bits=4, act_bits=4)


def _mha(**kwargs):
    mha = nn.MultiheadAttention(E, H, **kwargs)
    with torch.no_grad():  # torch initialises the biases at 0: give them values
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_()
    return mha


def _unquantized(mha):
    """The converted module with every projection quantized, run in full precision (the
    calibration pass's path)."""
    q = QMultiheadAttention.from_float(mha, {p: Q4 for p in ALL})
    for p in ALL:
        getattr(q, p)._fp_passthrough = True
    return q


CASES = {
    "seq-first": (dict(), dict()),
    "batch-first": (dict(batch_first=True), dict()),
    "kdim-vdim": (dict(kdim=5, vdim=3), dict()),
    "no-bias": (dict(bias=False), dict()),
    "bias-kv-zero-attn": (dict(add_bias_kv=True, add_zero_attn=True),
                          dict(key_padding_mask="bool", attn_mask="2d")),
    "masks-per-head": (dict(batch_first=True),
                       dict(key_padding_mask="float", attn_mask="3d", average_attn_weights=False)),
    "no-weights-masks": (dict(), dict(need_weights=False, key_padding_mask="bool", attn_mask="2d")),
    "causal": (dict(batch_first=True), dict(need_weights=False, attn_mask="causal", is_causal=True)),
    "unbatched": (dict(), dict(unbatched=True, key_padding_mask="bool")),
}


def _inputs(mha, L=3, S=4, N=2, unbatched=False, key_padding_mask=None, attn_mask=None, **call):
    kdim, vdim = mha.kdim, mha.vdim
    shape = (lambda n, d: (n, d)) if unbatched else (
        (lambda n, d: (N, n, d)) if mha.batch_first else (lambda n, d: (n, N, d)))
    if attn_mask == "causal":
        S = L
    query = torch.randn(shape(L, E))
    key, value = torch.randn(shape(S, kdim)), torch.randn(shape(S, vdim))
    kpm_shape = (S,) if unbatched else (N, S)
    if key_padding_mask == "bool":
        mask = torch.zeros(kpm_shape, dtype=torch.bool)
        mask[..., 1] = True
        call["key_padding_mask"] = mask
    elif key_padding_mask == "float":
        call["key_padding_mask"] = torch.randn(kpm_shape)
    if attn_mask == "2d":
        call["attn_mask"] = torch.rand(L, S) < 0.3
    elif attn_mask == "3d":
        call["attn_mask"] = torch.randn(N * H, L, S)
    elif attn_mask == "causal":
        call["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L)
    return (query, key, value), call


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["eval", "train-dropout"])
def test_unquantized_path_equals_multihead_attention(case, mode):
    ctor, call_spec = CASES[case]
    dropout = 0.3 if mode == "train-dropout" else 0.0
    mha = _mha(dropout=dropout, **ctor).train(mode != "eval")
    q = _unquantized(mha)
    assert q.training == mha.training
    args, call = _inputs(mha, **call_spec)
    torch.manual_seed(1)
    want = mha(*args, **call)
    torch.manual_seed(1)  # the same dropout draws (the FP projections draw nothing)
    got = q(*args, **call)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    if want[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)


def test_fp_projections_share_parameters_and_split_the_packed_one():
    mha = _mha(kdim=5, vdim=3, add_bias_kv=True)
    q = QMultiheadAttention.from_float(mha, {"out_proj": Q4})
    assert q.q_proj.weight is mha.q_proj_weight and q.k_proj.weight is mha.k_proj_weight
    assert q.out_proj.weight is mha.out_proj.weight and q.bias_k is mha.bias_k
    assert isinstance(q.out_proj, QLinear) and type(q.q_proj) is nn.Linear
    packed = _mha()
    q2 = QMultiheadAttention.from_float(packed)
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        rows = slice(i * E, (i + 1) * E)
        assert torch.equal(getattr(q2, name).weight, packed.in_proj_weight[rows])
        assert torch.equal(getattr(q2, name).bias, packed.in_proj_bias[rows])


@contextlib.contextmanager
def no_fast_path():
    """torch's fused attention / encoder-layer inference paths switched off."""
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(old)


class SelfAttention(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.attn = _mha(**kwargs)

    def forward(self, x):
        return self.attn(x, x, x)[0]


def test_quantized_projections_train():
    """Every projection is a QLinear on its input; the gradients reach every quantizer
    parameter and the module's own weights."""
    student = gdnsq.quantize_model(SelfAttention(batch_first=True), 4, 4, keep_first=False,
                                   keep_last=False)
    attn = student.attn
    assert isinstance(attn, QMultiheadAttention)
    assert all(isinstance(getattr(attn, p), QLinear) for p in ALL)
    x = torch.randn(2, 5, E)
    # calibrated on a narrower input: some of x falls outside each grid, so the ranges get a
    # gradient too (the straight-through range gradient comes from the clamped values)
    gdnsq.calibrate(student, [0.3 * torch.randn(4, 5, E)])
    student.train()
    out = student(x)
    (out ** 2).sum().backward()
    for name, p in student.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    quantizer_params = [n for n, p in student.named_parameters() if "quantizer" in n and p.requires_grad]
    assert len(quantizer_params) >= 4 * 3  # weight step + activation step and range per projection
    # quantized: the output differs from the FP module's
    assert not torch.allclose(out, gdnsq.teacher_of(student)(x))


def test_encoder_layer_in_eval_does_not_take_the_fused_path(monkeypatch):
    layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True)
    student = gdnsq.quantize_model(layer, 4, 4, keep_first=False, keep_last=False)
    assert isinstance(student.self_attn, QMultiheadAttention)
    x = torch.randn(2, 5, E)
    gdnsq.calibrate(student, [x])
    student.eval()
    with torch.no_grad(), no_fast_path():
        want = student(x)
    # the fused kernel reads self_attn.in_proj_weight directly: it must not be reached
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd",
                        lambda *a, **k: pytest.fail("fused encoder-layer path taken"))
    with torch.no_grad():
        got = student(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_encoder_stack_with_padding_mask_in_eval_skips_nested_tensors():
    layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2)  # enable_nested_tensor: the default
    assert encoder.use_nested_tensor
    student = gdnsq.quantize_model(encoder, 4, 4, keep_first=False, keep_last=False)
    assert not student.use_nested_tensor
    x = torch.randn(2, 5, E)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    gdnsq.calibrate(student, [x])
    student.eval()
    with torch.no_grad():
        got = student(x, src_key_padding_mask=pad)
        with no_fast_path():
            want = student(x, src_key_padding_mask=pad)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


class CrossAttention(nn.Module):
    """Queries from one sequence, keys/values (other widths) from another, with masks."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, E)
        self.attn = _mha(kdim=5, vdim=3, batch_first=True)
        self.head = nn.Linear(E, 4)

    def forward(self, x):
        query = self.inp(x[..., :6])
        memory = x[..., 6:11]
        pad = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
        pad[:, -1] = True
        out, _ = self.attn(query, memory, memory[..., :3], key_padding_mask=pad)
        return self.head(out.mean(1))


def test_cross_attention_freezes_to_the_exact_fake_quant_model(tmp_path):
    student = gdnsq.quantize_model(CrossAttention(), 3, 3)
    assert isinstance(student.attn, QMultiheadAttention)
    data = [torch.randn(4, 6, 11) for _ in range(2)]
    gdnsq.calibrate(student, data, bits=3)
    student.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # realised bits above the targets: deployed anyway
        frozen = freeze(student)
    assert type(frozen.attn.q_proj).__name__ == "DeployedLinear"
    gdnsq.set_exact_inference(student)
    with torch.no_grad():
        for x in data:
            torch.testing.assert_close(frozen(x), student(x), rtol=1e-6, atol=1e-6)
    # saved and loaded into a converted skeleton (the FP one has no projection modules)
    save(frozen, tmp_path / "cross.gdnsq")
    loaded = load(tmp_path / "cross.gdnsq", model=gdnsq.quantize_model(CrossAttention(), 3, 3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(data[0]), frozen(data[0]), rtol=0, atol=0)


def test_errors():
    with pytest.raises(TypeError, match="mha"):
        QMultiheadAttention.from_float(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="quantize.*in_proj"):
        QMultiheadAttention.from_float(_mha(), {"in_proj": Q4})
    with pytest.raises(ValueError, match="divisible"):
        QMultiheadAttention(6, 4)
    q = QMultiheadAttention.from_float(_mha())
    x = torch.randn(3, 2, E)
    with pytest.raises(ValueError, match="key_padding_mask"):
        q(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        q(x, x, x, attn_mask=torch.zeros(2, 2))
    with pytest.raises(TypeError, match="attn_mask"):
        q(x, x, x, attn_mask=torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="is_causal"):
        q(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="3-D"):
        q(x, x[0], x)
