"""Packaging: one version, license metadata, triton optional (marker + imports and runs without it)."""
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import gdnsq
import gdnsq_kernels

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup_kwargs():
    """The keyword arguments setup.py passes to setuptools.setup (setup itself is not run)."""
    setuptools = pytest.importorskip("setuptools")
    captured = {}
    real = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    try:
        code = compile((ROOT / "setup.py").read_text(encoding="utf-8"), str(ROOT / "setup.py"), "exec")
        exec(code, {"__file__": str(ROOT / "setup.py"), "__name__": "__main__"})
    finally:
        setuptools.setup = real
    return captured


def test_version_is_written_once_and_read_without_torch(setup_kwargs):
    assert setup_kwargs["version"] == gdnsq.__version__ == gdnsq_kernels.__version__
    text = "".join(p.read_text(encoding="utf-8") for p in [ROOT / "setup.py", *ROOT.glob("gdnsq*/**/*.py")])
    assert text.count(f'"{gdnsq.__version__}"') == 1  # only gdnsq/__init__.py spells it
    # setup.py must run where torch is not installed yet (pip's build step): block torch
    probe = textwrap.dedent("""
        import sys, setuptools
        sys.modules["torch"] = None
        setuptools.setup = lambda **kw: print(kw["version"])
        exec(compile(open("setup.py").read(), "setup.py", "exec"), {"__file__": "setup.py", "__name__": "__main__"})
    """)
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == gdnsq.__version__


def test_license_and_metadata(setup_kwargs):
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert license_text.startswith("MIT License") and "WITHOUT WARRANTY" in license_text
    assert setup_kwargs["license"] == "MIT" and setup_kwargs["license_files"] == ["LICENSE"]
    assert setup_kwargs["url"].startswith("https://")
    assert "Programming Language :: Python :: 3.11" in setup_kwargs["classifiers"]
    # python_requires admits the tested interpreter (3.11) and nothing older
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(setup_kwargs["python_requires"])
    assert "3.11.7" in spec and "3.10.14" not in spec
    assert f"{sys.version_info.major}.{sys.version_info.minor}.0" in spec


@pytest.mark.parametrize("platform,machine,wanted", [
    ("linux", "x86_64", True), ("linux", "aarch64", True), ("darwin", "arm64", False),
    ("win32", "AMD64", False), ("linux", "ppc64le", False)])
def test_triton_is_required_only_where_it_has_wheels(setup_kwargs, platform, machine, wanted):
    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in setup_kwargs["install_requires"]]
    triton = [r for r in reqs if r.name == "triton"]
    assert len(triton) == 1 and triton[0].marker is not None
    env = {"sys_platform": platform, "platform_machine": machine}
    assert triton[0].marker.evaluate(env) is wanted
    # everything else is required everywhere
    assert all(r.marker is None for r in reqs if r.name != "triton")


_WITHOUT_TRITON = textwrap.dedent("""
    import sys, warnings
    # What a macOS / Windows install looks like: "import triton" fails.
    for name in ("triton", "triton.language"):
        sys.modules[name] = None
    import torch
    import gdnsq, gdnsq_kernels, gdnsq.cli, gdnsq.deploy
    from gdnsq_kernels import backend as kb
    assert kb.triton_available() is False
    sys.path.insert(0, "tests")
    from _deploy_helpers import make_qmodel

    torch.manual_seed(0)
    q = make_qmodel(2, 2)
    x = torch.randn(3, 3, 12, 12)
    q.train()
    out = q(x)                              # auto -> the fused C++ (or torch) CPU path
    out.square().sum().backward()
    grads = [p.grad for p in q.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    q.eval()
    with torch.no_grad():
        want = q(x)
        w1 = gdnsq.deploy.freeze(make_qmodel(1, 1))(x)   # bit-packed W1A1 on CPU
        got = gdnsq.deploy.freeze(q)(x)
    assert torch.isfinite(w1).all()
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    try:
        gdnsq_kernels.quantize_weight(torch.randn(4, 3), torch.zeros(4), backend="triton")
    except RuntimeError as e:
        assert "triton package is not installed" in str(e) and "\\n" not in str(e), e
    else:
        raise AssertionError("backend='triton' without triton did not raise")
    assert sys.modules.get("triton") is None   # nothing imported it behind our back
    print("ok without triton")
""")


def test_imports_and_runs_on_cpu_without_triton():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("GDNSQ_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok without triton" in out.stdout
