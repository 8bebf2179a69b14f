"""The fused LoRA delta, as pure functions over stacked adapter tensors.

Semantics (what every path computes, row by row):
    delta[b] = sum_i w[b, i] * scale_i * (x[b] @ A_i.T) @ B_i.T
`lora_delta_loop` is that sentence written as a Python loop; it is the reference the fast paths are
tested against and is never used outside tests. Stacks come from the adapter bank: A (N, r, d_in) and
Bt (N, r, d_out) with the scale already folded into Bt, zero-padded to a common rank r.
"""

from __future__ import annotations

import torch

__all__ = [
    "lora_delta_loop",
    "gather_stacks",
    "lora_delta_gathered",
    "dense_mask",
    "lora_delta_dense",
    "merged_weight",
    "merged_factors",
    "merge_into",
]


def lora_delta_loop(
    x: torch.Tensor, adapters: list[tuple[torch.Tensor, torch.Tensor, float] | None], weights: torch.Tensor, d_out: int
) -> torch.Tensor:
    """Reference, straight from the unstacked adapters.

    x: (B, T, d_in); adapters[i]: (A_i (r_i, d_in), B_i (d_out, r_i), scale_i), or None when adapter i does
    not target this module; weights: (B, N) -> (B, T, d_out).
    """
    out = torch.zeros(*x.shape[:-1], d_out, dtype=x.dtype, device=x.device)
    for b in range(x.shape[0]):
        for i, term in enumerate(adapters):
            if term is not None and weights[b, i] != 0:
                A, B, scale = term
                out[b] += weights[b, i] * scale * ((x[b] @ A.T.to(x.dtype)) @ B.T.to(x.dtype))
    return out


def gather_stacks(
    A: torch.Tensor, Bt: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row stacks of only the selected adapters, weights folded into the B side.

    A: (N, r, d_in); Bt: (N, r, d_out); indices, weights: (B, k)
    -> A_sel (B, k*r, d_in), Bt_sel (B, k*r, d_out). Done once per routed request, reused every step.
    """
    b, k = indices.shape
    r = A.shape[1]
    A_sel = A[indices].reshape(b, k * r, A.shape[-1])
    Bt_sel = (Bt[indices] * weights.to(Bt.dtype)[:, :, None, None]).reshape(b, k * r, Bt.shape[-1])
    return A_sel, Bt_sel


def lora_delta_gathered(x: torch.Tensor, A_sel: torch.Tensor, Bt_sel: torch.Tensor) -> torch.Tensor:
    """x: (B, T, d_in); A_sel: (B, k*r, d_in); Bt_sel: (B, k*r, d_out) -> (B, T, d_out).

    Two batched matmuls whose width is k*r, independent of the number of adapters in the bank.
    """
    return torch.bmm(torch.bmm(x, A_sel.transpose(1, 2)), Bt_sel)


def dense_mask(weights: torch.Tensor, rank: int) -> torch.Tensor:
    """(B, N) adapter weights -> (B, N*r) weight of each stacked rank row."""
    return weights.repeat_interleave(rank, dim=1)


def lora_delta_dense(x: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x: (B, T, d_in); A: (N, r, d_in); Bt: (N, r, d_out); mask: (B, N*r) -> (B, T, d_out).

    Every adapter is applied to every row and masked: cost grows with N, but it is three plain matmuls.
    """
    n, r, d_in = A.shape
    h = torch.matmul(x, A.reshape(n * r, d_in).T) * mask[:, None, :].to(x.dtype)
    return torch.matmul(h, Bt.reshape(n * r, -1))


def merged_factors(
    A: torch.Tensor, Bt: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One shared mixture as a single LoRA: indices, weights (k,) -> A_mix (k*r, d_in) with the weights
    folded in, Bt_mix (k*r, d_out); B_mix A_mix = sum_j weights_j * B_{indices_j} A_{indices_j}.

    Only the k selected adapters enter, so the cost is that of k adapters, not N.
    """
    k, r, d_in = indices.shape[0], A.shape[1], A.shape[2]
    w = weights.to(A.dtype).repeat_interleave(r)
    return A[indices].reshape(k * r, d_in) * w[:, None], Bt[indices].reshape(k * r, -1)


def merge_into(W: torch.Tensor, A_mix: torch.Tensor, Bt_mix: torch.Tensor) -> torch.Tensor:
    """A new (d_out, d_in) weight W + B_mix A_mix, formed in the wider of the two dtypes and rounded once
    to W's dtype; W is untouched."""
    wide = torch.promote_types(W.dtype, A_mix.dtype)
    return (W.to(wide) + (Bt_mix.T @ A_mix).to(wide)).to(W.dtype)


def merged_weight(W: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """W + sum_i mix_i * B_i A_i for one dense mixture mix (N,) (its nonzeros are read on mix's device)."""
    used = mix.nonzero().flatten()
    return merge_into(W, *merged_factors(A, Bt, used, mix[used]))
