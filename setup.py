"""Install gdnsq (the GDNSQ method) and gdnsq_kernels (its fused Triton/CPU ops).

On a CPU-only machine install the CPU build of torch first (see README), otherwise pip may pull
a multi-GB CUDA build to satisfy ``torch``.
"""
from setuptools import find_packages, setup

setup(
    name="gdnsq",
    version="0.1.0",
    description=(
        "GDNSQ (Gradual Differentiable Noise Scale Quantization) for PyTorch, "
        "with fused Triton kernels and bit-packed W1A1 inference"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["gdnsq", "gdnsq.*", "gdnsq_kernels", "gdnsq_kernels.*"]),
    package_data={"gdnsq_kernels": ["csrc/*.cpp"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
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
    extras_require={"test": ["pytest>=7,<10", "pytest-benchmark>=4,<6"]},
    entry_points={"console_scripts": ["gdnsq=gdnsq.cli:main"]},
)
