"""Plain-PyTorch oracle of ``gdnsq_kernels.plan_ops`` (written from the definitions, sharing no
code with the kernels; slow, for tests).

Codes: torch's float32 clamp / subtract / divide / round (the same operations as
``gdnsq.deploy.layers._DeployedBase.float_codes``), NaN -> 0. Window sums: a float64 conv with
a ones kernel per group (exact: small integers). Epilogue: float64 tensors, one op at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def quantize(x: Tensor, s: float, lo: float, hi: float, groups: int = 1):
    f = torch.float32
    v = torch.clamp(x.to(f), torch.tensor(lo, dtype=f), torch.tensor(hi, dtype=f))
    q = torch.round((v - torch.tensor(lo, dtype=f)) / torch.tensor(s, dtype=f))
    q = torch.nan_to_num(q, nan=0.0).to(torch.uint8)
    M, C = q.shape
    sums = q.to(torch.int64).view(M, groups, C // groups).sum(2).to(torch.int32) if groups else \
        torch.zeros(M, 0, dtype=torch.int32)
    return q, sums


def box_sum(s: Tensor, kernel, stride=1, padding=0, dilation=1) -> Tensor:
    G = s.shape[3]
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    ones = torch.ones(G, 1, kh, kw, dtype=torch.float64)
    out = F.conv2d(s.permute(0, 3, 1, 2).double(), ones, stride=stride, padding=padding, dilation=dilation,
                   groups=G)
    return out.round().to(torch.int32).permute(0, 2, 3, 1).contiguous()


def epilogue_float(acc: Tensor, sj: Tensor, a: Tensor, b: Tensor, cst: Tensor, order: int = 0) -> Tensor:
    M, O = acc.shape
    G, P = sj.shape[1], cst.shape[0]
    s = sj.double().repeat_interleave(O // G, dim=1)
    c = cst.repeat(M // P, 1)
    t = a.view(1, O) * acc.double()
    u = b.view(1, O) * s
    y = (t + u) + c if order == 0 else (t + c) + u
    return y.float()


def epilogue_codes(acc, sj, a, b, cst, order, thr: Tensor, direction: Tensor, groups: int = 1):
    y = epilogue_float(acc, sj, a, b, cst, order)
    ge = (y.unsqueeze(-1) >= thr.unsqueeze(0)).sum(-1)
    le = (y.unsqueeze(-1) <= thr.unsqueeze(0)).sum(-1)
    q = torch.where(direction.view(1, -1) > 0, ge, le).to(torch.uint8)
    M, O = q.shape
    sums = q.to(torch.int64).view(M, groups, O // groups).sum(2).to(torch.int32) if groups else \
        torch.zeros(M, 0, dtype=torch.int32)
    return q, sums


def channel_sums(codes: Tensor, groups: int = 1) -> Tensor:
    M, C = codes.shape
    return codes.to(torch.int64).view(M, groups, C // groups).sum(2).to(torch.int32)


def pack_bits(codes: Tensor) -> Tensor:
    M, K = codes.shape
    W = (K + 63) // 64
    bits = torch.zeros(M, W * 64, dtype=torch.int64)
    bits[:, :K] = (codes.to(torch.int64) & 1)
    weights = torch.tensor([1 << i for i in range(63)] + [-(1 << 63)], dtype=torch.int64)
    return (bits.view(M, W, 64) * weights).sum(-1)
