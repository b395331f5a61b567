"""CIFAR ResNets: architecture, option-A shortcut, checkpoint layouts and mismatch errors."""
import collections

import pytest
import torch
import torch.nn.functional as F

from gdnsq.models import (read_checkpoint, MODELS, CheckpointMismatch, OptionAShortcut, extract_state_dict,
                          get_model, load_fp_checkpoint, save_fp_checkpoint)


@pytest.mark.parametrize("name,n", [("resnet20", 3), ("resnet32", 5), ("resnet44", 7),
                                    ("resnet56", 9)])
def test_depth_and_shapes(name, n):
    m = get_model(name, num_classes=7)
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    assert len(convs) + 1 == 6 * n + 2  # + the classifier
    assert all(c.bias is None and c.kernel_size == (3, 3) for c in convs)  # no 1x1 shortcuts
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    # the three stages: 16 ch @32x32, 32 ch @16x16, 64 ch @8x8
    assert [m.layer1[0].conv1.in_channels, m.layer2[0].conv1.out_channels,
            m.layer3[-1].conv2.out_channels] == [16, 32, 64]
    assert m.layer2[0].conv1.stride == (2, 2) and m.layer3[0].conv1.stride == (2, 2)


def test_resnet20_parameter_count():
    # 0.27 M as published for the CIFAR ResNet-20 (option A has no shortcut parameters)
    n = sum(p.numel() for p in get_model("resnet20").parameters())
    assert n == 269_722


def test_option_a_shortcut_matches_definition():
    x = torch.randn(3, 16, 32, 32)
    got = OptionAShortcut(8)(x)
    ref = torch.zeros(3, 32, 16, 16)
    ref[:, 8:24] = x[:, :, ::2, ::2]
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # and the block uses it: the residual of block layer2.0 with zeroed convs is the shortcut
    m = get_model("resnet20").eval()
    blk = m.layer2[0]
    for p in blk.parameters():
        torch.nn.init.zeros_(p)
    y = torch.rand(1, 16, 32, 32)
    torch.testing.assert_close(blk(y), F.relu(OptionAShortcut(8)(y)))


def test_unknown_model():
    with pytest.raises(ValueError, match="model must be one of .*resnet20"):
        get_model("resnet18")
    assert set(MODELS) == {"resnet20", "resnet32", "resnet44", "resnet56"}


def _akamaster_file(tmp_path, model):
    # the akamaster layout: DataParallel prefix, no num_batches_tracked, best_prec1 beside it
    sd = collections.OrderedDict(("module." + k, v.clone()) for k, v in model.state_dict().items()
                                 if not k.endswith("num_batches_tracked"))
    path = tmp_path / "aka.th"
    torch.save({"best_prec1": 91.0, "state_dict": sd}, path)
    return path


def test_load_akamaster_layout(tmp_path):
    src = get_model("resnet20")
    for m in src.modules():  # non-trivial BN statistics, so the buffers are checked too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = _akamaster_file(tmp_path, src)
    dst = get_model("resnet20")
    meta = load_fp_checkpoint(dst, path)
    assert meta["normalization"] == "imagenet" and meta["format"] == "akamaster"
    assert meta["best_prec1"] == 91.0
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x), rtol=0, atol=0)


def test_own_checkpoint_roundtrip(tmp_path):
    src = get_model("resnet32", 100)
    save_fp_checkpoint(tmp_path / "c.pt", src, model_name="resnet32", num_classes=100,
                       normalization="cifar100", epoch=3)
    assert not list(tmp_path.glob("*.tmp"))
    dst = get_model("resnet32", 100)
    meta = load_fp_checkpoint(dst, tmp_path / "c.pt")
    assert meta == {"normalization": "cifar100", "format": "gdnsq-fp", "model": "resnet32",
                    "best_prec1": None, "epoch": 3}
    for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_mismatch_errors(tmp_path):
    path = _akamaster_file(tmp_path, get_model("resnet20"))
    with pytest.raises(CheckpointMismatch, match="does not fit the model: .*missing keys"):
        load_fp_checkpoint(get_model("resnet32"), path)
    with pytest.raises(CheckpointMismatch, match=r"shape mismatches \(e.g. linear.weight"):
        load_fp_checkpoint(get_model("resnet20", 100), path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_fp_checkpoint(get_model("resnet20"), tmp_path / "nope.th")
    (tmp_path / "junk.th").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        load_fp_checkpoint(get_model("resnet20"), tmp_path / "junk.th")
    with pytest.raises(ValueError, match="no model state dict"):
        extract_state_dict({"epoch": 3})


class _RunsCodeWhenUnpickled:
    """Unpickling this calls os.system-like code: exactly what weights_only=True must refuse."""

    def __reduce__(self):
        return (_record_unpickling, ("unpickled",))


_UNPICKLED = []


def _record_unpickling(tag):
    _UNPICKLED.append(tag)
    return tag


def test_checkpoint_with_python_objects_is_refused_without_running_them(tmp_path):
    path = tmp_path / "evil.th"
    torch.save({"state_dict": get_model("resnet20").state_dict(), "hook": _RunsCodeWhenUnpickled()}, path)
    _UNPICKLED.clear()
    with pytest.raises(ValueError, match=r"checkpoint .*evil.th holds a Python object "
                                         r"\(.*_record_unpickling\).*weights_only=True") as err:
        load_fp_checkpoint(get_model("resnet20"), path)
    assert "\n" not in str(err.value)
    assert _UNPICKLED == []  # the code in the file never ran
    with pytest.raises(ValueError, match="evil.th holds a Python object"):
        read_checkpoint(path)


def test_read_checkpoint_verifies_trainer_checkpoints(tmp_path):
    from gdnsq.train.checkpoint import CHECKPOINT_FORMAT, save_checkpoint

    sd = get_model("resnet20").state_dict()
    path = tmp_path / "checkpoint_best.pt"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "student": sd}, str(path))
    got = extract_state_dict(read_checkpoint(path))
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checkpoint_best.pt is corrupt: its SHA-256 checksum"):
        read_checkpoint(path)


def test_shared_akamaster_checkpoints_fit(shared_models_dir):
    for name in ("resnet20", "resnet56"):
        path = shared_models_dir / f"{name}_cifar10_akamaster.th"
        if not path.is_file():
            pytest.skip(f"{path} not found")
        meta = load_fp_checkpoint(get_model(name), path)
        assert meta["format"] == "akamaster" and meta["normalization"] == "imagenet"
