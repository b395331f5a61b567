"""Jeffreys divergence, bit-width penalty (values, weights, finite-difference gradients) and the
GDNSQ objective's running-mean scaling."""
import math

import pytest
import torch
import torch.nn.functional as F

from gdnsq import BitWidthPenalty, GDNSQObjective, jeffreys_divergence, quantize_model, read_parts
from gdnsq.stats import quantized_layers

from _method_models import TinyResNet, tiny_mlp, tiny_vgg


def test_jeffreys_matches_two_kl_and_gradcheck():
    s = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, dtype=torch.float64)
    ref = (F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="batchmean", log_target=True)
           + F.kl_div(F.log_softmax(t, 1), F.log_softmax(s, 1), reduction="batchmean", log_target=True))
    torch.testing.assert_close(jeffreys_divergence(s, t), ref)
    assert torch.autograd.gradcheck(lambda a: jeffreys_divergence(a, t), (s,))
    assert float(jeffreys_divergence(t, t)) == 0.0
    assert jeffreys_divergence(s.float(), t.float()).dtype == torch.float32
    with pytest.raises(ValueError, match="student_logits"):
        jeffreys_divergence(torch.zeros(2, 3), torch.zeros(2, 4))


def _student(seed=0):
    torch.manual_seed(seed)
    st = quantize_model(TinyResNet(), {"layer1.conv1": 3, "*": 2}, 4).double()
    for i, (_, layer) in enumerate(quantized_layers(st)):
        with torch.no_grad():
            c = layer.weight.shape[0]
            layer.weight_quantizer.log2_step.copy_(torch.linspace(-3.0, -1.0, c, dtype=torch.float64) - 0.3 * i)
            aq = layer.act_quantizer
            aq.log2_step.fill_(-4.0 + 0.7 * i)
            aq.log2_range.fill_(1.0)
    return st


def _manual(st, eps):
    hw, ha = [], []
    for _, layer in quantized_layers(st):
        w = layer.weight.reshape(layer.weight.shape[0], -1)
        b = torch.log2((w.amax(1) - w.amin(1)) / torch.exp2(layer.weight_quantizer.log2_step) + 1)
        hw.append(torch.clamp_min(b - (float(layer.weight_quantizer.target_bits) - eps), 0))
        aq = layer.act_quantizer
        ha.append(torch.clamp_min((aq.log2_range - aq.log2_step) - (float(aq.target_bits) - eps), 0).reshape(1))
    return torch.cat(hw), torch.cat(ha)


def test_penalty_values_and_weights():
    st = _student()
    eps = 1e-3
    pen = BitWidthPenalty(epsilon=eps)(st)
    hw, ha = _manual(st, eps)
    assert pen["count_w"] == 4 + 4 + 8 + 8 and pen["count_a"] == 4
    torch.testing.assert_close(pen["loss_w"], hw.mean())
    torch.testing.assert_close(pen["loss_a"], ha.mean())
    n_w, n_a = int((hw > 0).sum()), int((ha > 0).sum())
    assert 0 < n_w < hw.numel() and 0 < n_a < ha.numel()  # some constraints inactive
    assert (pen["active_w"], pen["active_a"]) == (n_w, n_a)
    assert pen["omega_w"] == pytest.approx((n_w + eps) / (n_w + n_a + eps))
    assert pen["omega_a"] == pytest.approx((n_a + eps) / (n_w + n_a + eps))


def test_penalty_gradient_finite_differences():
    st = _student()
    eps = 1e-3
    pen_fn = BitWidthPenalty(epsilon=eps)

    def total():
        p = pen_fn(st)
        return p["omega_w"] * p["loss_w"] + p["omega_a"] * p["loss_a"]

    params = [p for n, p in st.named_parameters() if ("quantizer" in n and "offset" not in n) or (n.endswith("weight") and
              any(n.startswith(q) for q, _ in quantized_layers(st)))]
    grads = torch.autograd.grad(total(), params)
    checked = 0
    gen = torch.Generator().manual_seed(1)
    for p, g in zip(params, grads):
        flat, gflat = p.data.view(-1), g.reshape(-1)
        for idx in torch.randperm(flat.numel(), generator=gen)[:6].tolist() + [int(gflat.abs().argmax())]:
            old = float(flat[idx])
            h = 1e-6
            with torch.no_grad():
                flat[idx] = old + h
                up = float(total())
                flat[idx] = old - h
                down = float(total())
                flat[idx] = old
            fd = (up - down) / (2 * h)
            assert fd == pytest.approx(float(gflat[idx]), rel=1e-5, abs=1e-8), (p.shape, idx)
            checked += 1 if fd != 0 else 0
    assert checked > 10


def test_penalty_skips_pruned_and_disabled_and_frozen():
    st = _student()
    layers = [layer for _, layer in quantized_layers(st)]
    layers[0].act_quantizer.pruned.fill_(True)
    layers[1].act_quantizer.enabled = False
    layers[2].weight_quantizer.log2_step.requires_grad_(False)
    pen = BitWidthPenalty()(st)
    assert pen["count_a"] == 2 and pen["count_w"] == 4 + 4 + 8
    vgg = quantize_model(tiny_vgg(), 2, None)
    pen = BitWidthPenalty()(vgg)
    assert pen["count_a"] == 0 and float(pen["loss_a"]) == 0.0 and pen["omega_a"] < 1e-3


def test_objective_running_mean_and_formula():
    st = _student().train()
    obj = GDNSQObjective(st)
    gen = torch.Generator().manual_seed(0)
    logits = [(torch.randn(4, 10, generator=gen, dtype=torch.float64),
               torch.randn(4, 10, generator=gen, dtype=torch.float64)) for _ in range(3)]
    ds = []
    for k, (s, t) in enumerate(logits):
        loss, parts = obj(s, t, 0.5)
        parts = read_parts(parts)
        d = float(jeffreys_divergence(s, t))
        mu = sum(ds) / (1 + k)  # count starts at 1: mu = 0 at step 0
        assert parts["mu"] == pytest.approx(mu)
        pen = BitWidthPenalty()(st)
        want = d + 0.5 * mu * (float(pen["omega_w"]) * float(pen["loss_w"].detach())
                               + float(pen["omega_a"]) * float(pen["loss_a"].detach()))
        assert float(loss.detach()) == pytest.approx(want) and parts["loss"] == pytest.approx(want)
        assert parts["distill"] == pytest.approx(d) and parts["t"] == 0.5
        assert isinstance(parts["active_w"], int) and parts["active_w"] == int(pen["active_w"])
        ds.append(d)
    state = obj.state_dict()
    assert set(state) == {"loss_sum", "count"}  # the student is not part of its objective's state
    assert float(state["loss_sum"]) == pytest.approx(sum(ds)) and int(state["count"]) == 4
    # eval mode does not update mu
    st.eval()
    obj(*logits[0], 1.0)
    assert int(obj.state_dict()["count"]) == 4
    # restore into a fresh objective; reduce_fn is applied before the update
    st.train()
    obj2 = GDNSQObjective(st)
    obj2.load_state_dict(state)
    assert float(obj2.mu) == pytest.approx(float(obj.mu))
    obj2.reduce_fn = lambda d: d * 0 + 2.0
    obj2(*logits[0], 0.0)
    assert float(obj2.state_dict()["loss_sum"]) == pytest.approx(sum(ds) + 2.0)
    with pytest.raises(ValueError, match="loss_sum"):
        obj2.load_state_dict({})


def test_objective_labels_and_gradient_reaches_quantizers():
    st = quantize_model(TinyResNet(), 2, 2).train()
    obj = GDNSQObjective(st)
    x = torch.randn(2, 3, 8, 8)
    y = torch.tensor([1, 3])
    out = st(x)
    loss, _ = obj(out, None, 0.0, labels=y)
    torch.testing.assert_close(loss, F.cross_entropy(out, y))
    with pytest.raises(ValueError, match="labels"):
        obj(out, None, 0.0)
    obj.load_state_dict({"loss_sum": 3.0, "count": 2})  # mu = 1.5 (plain numbers: gdnsq 0.1 checkpoints)
    loss, parts = obj(st(x), torch.randn(2, 10), 1.0)
    loss.backward()
    layer = st.layer1.conv1
    assert parts["penalty_w"] > 0 and parts["penalty_a"] > 0
    assert layer.act_quantizer.log2_range.grad is not None and float(layer.act_quantizer.log2_range.grad) > 0
    assert math.isfinite(float(layer.weight_quantizer.log2_step.grad.sum()))


# --------------------------------------------------------------------------- any base loss, any loop

def _mlp_student():
    torch.manual_seed(3)
    st = quantize_model(tiny_mlp(), 2, 2).train()
    for _, layer in quantized_layers(st):
        with torch.no_grad():
            layer.act_quantizer.log2_step.fill_(-4.0)
            layer.act_quantizer.log2_range.fill_(1.0)
    return st


def test_token_level_jeffreys_with_mask_matches_kl_over_the_kept_tokens():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    keep = mask.bool()
    ks, kt = F.log_softmax(s[keep], -1), F.log_softmax(t[keep], -1)  # (7 kept tokens, V)
    ref = (F.kl_div(ks, kt, reduction="batchmean", log_target=True)
           + F.kl_div(kt, ks, reduction="batchmean", log_target=True))
    torch.testing.assert_close(jeffreys_divergence(s, t, mask), ref)
    flat = (F.kl_div(F.log_softmax(s.reshape(10, 7), -1), F.log_softmax(t.reshape(10, 7), -1), reduction="batchmean",
                     log_target=True)
            + F.kl_div(F.log_softmax(t.reshape(10, 7), -1), F.log_softmax(s.reshape(10, 7), -1), reduction="batchmean",
                       log_target=True))
    torch.testing.assert_close(jeffreys_divergence(s, t), flat)  # no mask: every token
    assert float(jeffreys_divergence(s.detach(), t, torch.zeros(2, 5))) == 0.0  # nothing kept
    with pytest.raises(ValueError, match="mask"):
        jeffreys_divergence(s, t, torch.ones(2, 7))
    # the objective takes (B, T, V) logits with the mask
    st = _mlp_student()
    loss, parts = GDNSQObjective(st)(s, t, 0.0, mask=mask)
    torch.testing.assert_close(loss.double(), ref)


def test_cross_entropy_base_loss_for_sequences_leaves_out_ignored_tokens():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, generator=gen)
    labels = torch.tensor([[1, 2, -100, 3], [0, 5, 5, 1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    kept = [(b, i) for b in range(2) for i in range(4) if labels[b, i] != -100 and mask[b, i]]
    ref = sum(-F.log_softmax(logits[b, i], -1)[labels[b, i]] for b, i in kept) / len(kept)
    loss, _ = GDNSQObjective(_mlp_student())(logits, None, 0.0, labels=labels, mask=mask)
    torch.testing.assert_close(loss, ref)


def test_any_base_loss_callable_precomputed_and_the_penalty_term_alone():
    st = _mlp_student()
    gen = torch.Generator().manual_seed(2)
    logits, y = torch.randn(3, 5, generator=gen), torch.tensor([0, 4, 2])
    t = 0.7
    # the penalty term alone: t * mu * (w_w L_w + w_a L_a), mu left alone
    plain = GDNSQObjective(st)
    plain.load_state_dict({"loss_sum": 6.0, "count": 3})  # mu = 2
    term, parts = plain.penalty_term(t)
    pen = BitWidthPenalty()(st)
    want = t * 2.0 * (float(pen["omega_w"]) * float(pen["loss_w"]) + float(pen["omega_a"]) * float(pen["loss_a"]))
    assert float(term) == pytest.approx(want, rel=1e-6) and want > 0
    assert int(plain.count) == 3 and read_parts(parts)["mu"] == 2.0
    # a precomputed base loss: d + the term; d enters mu afterwards
    d = F.cross_entropy(logits, y)
    loss, parts = plain.add_penalty(d, t)
    assert float(loss) == pytest.approx(float(d) + want, rel=1e-6)
    assert float(plain.mu) == pytest.approx((6.0 + float(d)) / 4) and read_parts(parts)["distill"] == float(d)
    # a callable base loss gets (student_logits, teacher_logits, labels)
    seen = []

    def base_loss(s, teacher, labels):
        seen.append((teacher, labels))
        return F.cross_entropy(s, labels, label_smoothing=0.1)

    custom = GDNSQObjective(st, base_loss=base_loss)
    custom.load_state_dict({"loss_sum": 6.0, "count": 3})
    loss, _ = custom(logits, None, t, labels=y)
    assert seen[0][0] is None and seen[0][1] is y
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits, y, label_smoothing=0.1)) + want, rel=1e-6)
    with pytest.raises(TypeError, match="base_loss"):
        GDNSQObjective(st, base_loss="ce")
    with pytest.raises(TypeError, match="base loss"):
        plain.add_penalty(1.0, t)
    with pytest.raises(TypeError, match="t must be"):
        plain.penalty_term("0.5")
    # the student is referenced, not registered: the objective's state is mu's two buffers
    assert set(custom.state_dict()) == {"loss_sum", "count"} and list(custom.parameters()) == []


def _raise(*args, **kwargs):
    raise AssertionError("the objective read a tensor back to the host")


def test_objective_call_reads_nothing_from_the_device(monkeypatch):
    st = _mlp_student()
    st[3].act_quantizer.pruned.fill_(True)  # the pruned mask must not be read either
    obj = GDNSQObjective(st)
    gen = torch.Generator().manual_seed(4)
    s, t, y = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen), torch.tensor([1, 2, 3])
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, _raise)
    obj(s, t, 0.5)
    obj(s, None, torch.tensor(0.5), labels=y)
    obj.add_penalty(F.mse_loss(s, t), 0.5)
    obj.penalty_term(0.5)
    monkeypatch.undo()
    assert int(obj.count) == 4  # three training-mode calls after the initial count of 1


def test_objective_traces_whole_under_torch_compile():
    st = _mlp_student()
    st[3].act_quantizer.pruned.fill_(True)
    compiled_obj, eager_obj = GDNSQObjective(st), GDNSQObjective(st)
    step = torch.compile(lambda s, t: compiled_obj(s, t, 0.5), fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        s, t = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
        loss, parts = step(s, t)
        want, want_parts = eager_obj(s, t, 0.5)
        torch.testing.assert_close(loss, want)
        assert read_parts(parts) == pytest.approx(read_parts(want_parts))
    # the running mean was updated inside the graph
    torch.testing.assert_close(compiled_obj.state_dict()["loss_sum"], eager_obj.state_dict()["loss_sum"])
    assert int(compiled_obj.count) == 3
