"""Orthogonalization of PowerSGD's P factor: Householder QR after adding ε·I [P E.2(5)].

The paper replaced Gram-Schmidt with a custom Householder kernel because Gram-Schmidt "was numerically unstable"
[P E.2(5)]: (modified) Gram-Schmidt loses orthogonality in proportion to the condition number of P, Householder
QR does not. ``orthogonality_error`` is the figure the tests and ``benchmarks/powersgd.py`` report for both.
"""

from __future__ import annotations

import torch
from torch import Tensor


def householder_orthogonalize(p: Tensor, eps: float = 1e-6) -> Tensor:
    """Orthonormal columns spanning the columns of ``P + eps·I_{m×r}``: (..., m, r) with r ≤ m → (..., m, r).

    Implementation: ``torch.linalg.qr`` in reduced mode, which is Householder QR (LAPACK ``geqrf`` + ``orgqr`` on
    CPU, cuSOLVER/MAGMA ``geqrf`` + ``orgqr`` on CUDA), batched over the leading dimensions. Its orthogonality
    error is O(machine ε) whatever the conditioning of P, which is the property the paper's custom kernel was
    for; a hand-written Householder loop would be slower and no more accurate.

    - Computed in fp32 (fp64 when P is fp64, for tests); 16-bit inputs are upcast [P E.2(5)].
    - ``eps`` is added to the diagonal of the rectangular identity I_{m×r} first [P E.2(5)], so a P with a zero
      or repeated column still yields r orthonormal columns (the columns of I fill in the missing directions).
    - Signs are fixed so that R has a nonnegative diagonal: the result is then a function of P alone (no
      LAPACK sign convention leaks through), and every replica, holding the same all-reduced P, gets the same
      factor.
    """
    if p.dim() < 2 or p.shape[-1] > p.shape[-2]:
        raise ValueError(f"P must be (..., m, r) with r <= m; got {tuple(p.shape)} (transpose so that m >= r)")
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    a = p.to(dtype, copy=True)  # (..., m, r)
    a.diagonal(dim1=-2, dim2=-1).add_(eps)  # + ε·I_{m×r}: r diagonal entries [P E.2(5)]
    q, r = torch.linalg.qr(a, mode="reduced")  # q (..., m, r), r (..., r, r)
    sign = torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(dtype)  # (..., r)
    return q * sign.unsqueeze(-2)  # (..., m, r): diag(R) ≥ 0


def orthogonality_error(q: Tensor) -> float:
    """max |QᵀQ − I| over a (..., m, r) batch, computed in fp64 so the measurement adds no error of its own."""
    q64 = q.double()
    gram = q64.transpose(-2, -1) @ q64  # (..., r, r)
    eye = torch.eye(q.shape[-1], dtype=torch.float64, device=q.device)  # (r, r)
    return float((gram - eye).abs().max())


def ill_conditioned(
    m: int, r: int, cond: float, *, batch: int = 1, dtype: torch.dtype = torch.float32, seed: int = 0
) -> Tensor:
    """A (batch, m, r) test matrix U·diag(σ)·Vᵀ with singular values log-spaced from 1 down to 1/cond."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(batch, m, r, generator=g, dtype=torch.float64))  # (B, m, r)
    v, _ = torch.linalg.qr(torch.randn(batch, r, r, generator=g, dtype=torch.float64))  # (B, r, r)
    sigma = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), r, dtype=torch.float64)  # (r,)
    return ((u * sigma) @ v.transpose(-2, -1)).to(dtype)  # (B, m, r)
