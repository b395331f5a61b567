"""Install gdnsq (the GDNSQ method) and gdnsq_kernels (its fused Triton/CPU ops).

On a CPU-only machine install the CPU build of torch first (see README), otherwise pip may pull
a multi-GB CUDA build to satisfy ``torch``.
"""
import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).resolve().parent


def read_version() -> str:
    """``__version__`` of gdnsq/__init__.py, read as text (importing gdnsq would need torch)."""
    text = (HERE / "gdnsq" / "__init__.py").read_text(encoding="utf-8")
    found = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    if found is None:
        raise RuntimeError("gdnsq/__init__.py has no line __version__ = \"...\"")
    return found.group(1)


# Triton publishes wheels for Linux x86_64 and aarch64 only; elsewhere gdnsq runs its CPU paths
# (the fused C++ quantizer, the PyTorch fallbacks) and imports without triton.
TRITON_PLATFORMS = ("sys_platform == 'linux' and "
                    "(platform_machine == 'x86_64' or platform_machine == 'aarch64')")

setup(
    name="gdnsq",
    version=read_version(),
    description=(
        "GDNSQ (Gradual Differentiable Noise Scale Quantization) for PyTorch, "
        "with fused Triton kernels and bit-packed W1A1 inference"
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    url="https://github.com/gdnsq/gdnsq",
    project_urls={"Paper": "https://arxiv.org/abs/2508.14004",
                  "Source": "https://github.com/gdnsq/gdnsq"},
    author="The gdnsq authors",
    license="MIT",
    license_files=["LICENSE"],
    # CI tests Python 3.11 (.ci/run); older versions are not tested.
    python_requires=">=3.11",
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Intended Audience :: Developers",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=find_packages(include=["gdnsq", "gdnsq.*", "gdnsq_kernels", "gdnsq_kernels.*"]),
    package_data={"gdnsq_kernels": ["csrc/*.cpp"]},
    install_requires=[
        "torch>=2.4",
        f"triton>=3.0; {TRITON_PLATFORMS}",
        "numpy>=1.24",
        # ninja builds the fused C++ CPU path on first use (torch.utils.cpp_extension).
        "ninja",
        # Pillow decodes the CIFAR-10 PNG distribution.
        "Pillow>=9",
        # progress bars of the trainer and the CLI
        "tqdm>=4.62",
        # bits.png and curves.png (Agg backend, no display needed)
        "matplotlib>=3.5",
        # `gdnsq quantize --config FILE.yaml`
        "PyYAML>=5.1",
    ],
    # Optional integrations (docs/integrations.md); the tests install both to run the examples.
    extras_require={
        "hf": ["transformers>=4.40", "accelerate>=0.26"],
        "lightning": ["lightning>=2.2"],
        "test": ["pytest>=7,<10", "pytest-benchmark>=4,<6", "transformers>=4.40", "accelerate>=0.26",
                 "lightning>=2.2"],
    },
    entry_points={"console_scripts": ["gdnsq=gdnsq.cli:main"]},
)
