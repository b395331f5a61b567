"""The one place every Triton kernel of ``gdnsq_kernels`` is launched from.

``launch(kernel, grid, *args, exact=..., **meta)``:

* runs under ``torch.cuda.device(<the tensors' device>)``, so a tensor on ``cuda:1`` is never
  handed to a kernel launched on the current device (Triton launches on the current device);
* checks that every tensor argument is contiguous and on that one device (an internal bug
  otherwise: the kernels index flat row-major memory); ``contiguous()`` below is what the
  callers use to make their inputs so;
* ``exact=True`` launches with ``enable_fp_fusion=False``: without it LLVM contracts
  ``a + b*c`` into one ``fma.rn`` (one rounding), while the reference rounds the product and
  the sum separately, which can move a value across a rounding tie. The interpreter ignores
  the option (NumPy never fuses).

``kernel`` may be a ``triton.autotune`` wrapper (``Autotuner``); ``grid`` may then be a
function of the chosen config's meta-parameters, as in plain Triton.

A *recorder* (``record_launches()``) replaces the launch by a note of what would have been
launched (kernel, argument types, constexprs, options). The sm_90 compile tests use it to
compile exactly what the host code would launch on a GPU, on a machine without one. For an
autotuned kernel the record holds its first (default) config and lists every config in
``configs``, so that a test can compile each.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

_recorder: list | None = None


@dataclass
class LaunchRecord:
    kernel: object                      # the @triton.jit function
    grid: tuple
    signature: dict                     # arg name -> Triton type ("*fp32", "i32", ...)
    constexprs: dict                    # constexpr name -> value
    options: dict = field(default_factory=dict)  # num_warps, enable_fp_fusion, ...
    args: tuple = ()                    # the arguments themselves (tests check for copies)
    # autotuned kernels: every config as (constexprs, options); the record's own constexprs and
    # options are those of configs[0] merged with the launch's
    configs: list = field(default_factory=list)


@contextlib.contextmanager
def record_launches():
    """Within the block, ``launch`` records instead of launching; yields the list of records.

    ``targets_cuda()`` is True inside, so host code picks the choices it would make on a GPU.
    """
    global _recorder
    previous, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = previous


def targets_cuda(t: torch.Tensor) -> bool:
    """Whether launches for ``t`` compile for a GPU (a CUDA tensor, or recording for one)."""
    return t.is_cuda or _recorder is not None


def is_channels_last(t: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels_last (memory order N, H, W, C) and *not* also row-major.

    A tensor that is both (C == 1 or H*W == 1) counts as contiguous, so that every op output
    and every fake implementation picks the same format for it (``memory_format_of``)."""
    return (t.dim() == 4 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last))


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The memory format the ``gdnsq::`` ops give an output computed from ``t``:
    ``torch.channels_last`` for a channels_last 4-D tensor (see ``is_channels_last``), else
    ``torch.contiguous_format``. The kernels read both in memory order, so neither is copied."""
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def nhwc_view(t: torch.Tensor) -> torch.Tensor:
    """A channels_last (N, C, H, W) tensor as the row-major (N, H, W, C) view of its memory
    (a view: no copy); what kernels that take flat row-major buffers are handed."""
    return t.permute(0, 2, 3, 1)


def contiguous(*tensors):
    """The tensors made contiguous (row-major), as a tuple (a single tensor for one argument)."""
    out = tuple(t.contiguous() for t in tensors)
    return out[0] if len(out) == 1 else out


_TRITON_TYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32",
    torch.int64: "i64", torch.bool: "i1",
}


def _scalar_type(v) -> str:
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(v).__name__}")


def launch(kernel, grid, *args, exact: bool = False, num_warps: int | None = None,
           compile_only: bool = False, dense_ok: bool = False, **constexprs):
    """Launch ``kernel[grid](*args, **constexprs)`` on the device of its tensor arguments.

    ``compile_only=True`` compiles (``kernel.warmup``) without launching, so a caller can tell
    a compilation failure from a failure of the launch itself. ``dense_ok=True`` also accepts
    4-D channels_last tensors (for kernels that index memory order and know the layout).
    """
    tensors = [a for a in args if _is_pointer(a)]
    if not tensors:
        raise RuntimeError(f"{kernel}: a kernel launch needs at least one tensor argument")
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise RuntimeError(f"kernel arguments on {device} and {t.device}")
        if not (t.is_contiguous() or (dense_ok and t.dim() == 4
                                      and t.is_contiguous(memory_format=torch.channels_last))):
            raise RuntimeError(f"non-contiguous tensor argument of shape {tuple(t.shape)} "
                               f"and strides {t.stride()}")
    options = {}
    if num_warps is not None:
        options["num_warps"] = num_warps
    if exact:
        options["enable_fp_fusion"] = False
    if num_warps is not None and _is_autotuner(kernel):
        raise RuntimeError(f"{kernel}: num_warps comes from the autotuner's configs")
    if _recorder is not None:
        configs = []
        jit = kernel
        if _is_autotuner(kernel):
            jit = kernel.fn
            configs = [({**constexprs, **c.kwargs},
                        {**options, "num_warps": c.num_warps, "num_stages": c.num_stages})
                       for c in kernel.configs]
            rec_constexprs, rec_options = configs[0]
        else:
            rec_constexprs, rec_options = dict(constexprs), options
        names = [n for n in _arg_names(jit) if n not in rec_constexprs]
        sig = {n: (f"*{_TRITON_TYPES[a.dtype]}" if _is_pointer(a) else _scalar_type(a))
               for n, a in zip(names, args)}
        sig.update({n: "constexpr" for n in rec_constexprs})
        grid_t = tuple(grid(rec_constexprs) if callable(grid) else grid)
        if not compile_only:
            _recorder.append(LaunchRecord(jit, grid_t, sig, rec_constexprs, rec_options,
                                          tuple(args), configs))
        return None
    with device_guard(device):
        if compile_only:
            return kernel.warmup(*args, grid=grid, **constexprs, **options)
        return kernel[grid](*args, **constexprs, **options)


def _is_autotuner(kernel) -> bool:
    from triton.runtime.autotuner import Autotuner

    return isinstance(kernel, Autotuner)


def _is_pointer(a) -> bool:
    """A pointer argument, told the way Triton tells it (an object with ``data_ptr``)."""
    return hasattr(a, "data_ptr")


def _arg_names(kernel):
    names = getattr(kernel, "arg_names", None)
    if names is None:  # the interpreter's wrapper
        import inspect

        names = list(inspect.signature(kernel.fn).parameters)
    return list(names)


def device_guard(device: torch.device):
    """``torch.cuda.device(device)`` for a CUDA device, else a no-op context."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
