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
    "arrow_prototypes",
    "arrow_coefficients",
    "lora_delta_arrow",
    "lora_delta_arrow_loop",
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


def dense_mask(weights: torch.Tensor, rank: int | torch.Tensor) -> torch.Tensor:
    """(B, N) adapter weights -> (B, R) weight of each stacked rank row: rank r (every adapter padded to r
    rows: R = N*r), or owner (R,), the adapter of each row of an unpadded stack."""
    return weights.repeat_interleave(rank, dim=1) if isinstance(rank, int) else weights[:, rank]


def lora_delta_dense(x: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x: (B, T, d_in); A: (N, r, d_in) or (R, d_in); Bt: (N, r, d_out) or (R, d_out); mask: (B, R = N*r)
    -> (B, T, d_out).

    Every adapter is applied to every row and masked: cost grows with the bank's total rank R, but it is
    three plain matmuls.
    """
    A, Bt = A.reshape(-1, A.shape[-1]), Bt.reshape(-1, Bt.shape[-1])
    h = torch.matmul(x, A.T) * mask[:, None, :].to(x.dtype)
    return torch.matmul(h, Bt)


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


# ---- Arrow: per-token routing from the adapters themselves ----------------------------------------------


def arrow_prototypes(A: torch.Tensor, B: torch.Tensor, seed: int, iters: int, eps: float = 1e-8) -> torch.Tensor:
    """Top right singular vector of each B_e A_e by power iteration on A^T (B^T B) A, as PEFT computes it:
    float32, the same seeded start vector for every expert, `iters` steps, expert by expert with PEFT's own
    matrix-vector products (a batched product rounds differently, and a prototype 1e-8 off moves every later
    layer's routing coefficients by as much: so the prototypes equal PEFT's bit for bit).

    A: (E, r, d_in); B: (E, d_out, r) -> (E, d_in). Unique up to sign; Arrow reads |x . p|.
    """
    protos = []
    for a, b in zip(A.float(), B.float()):
        gen = torch.Generator(device=a.device.type).manual_seed(int(seed))
        v = torch.randn(a.shape[-1], dtype=torch.float32, device=a.device, generator=gen)
        v = v / (v.norm() + eps)
        c = b.T @ b  # (r, r)
        for _ in range(iters):
            w = a.T @ (c @ (a @ v))
            v = w / (w.norm() + eps)
        protos.append(v)
    return torch.stack(protos)


def arrow_coefficients(x: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """x: (..., d_in); prototypes: (E, d_in) -> (..., E): softmax(|x . p_e| / T) over each token's top_k
    experts, 0 elsewhere."""
    sim = torch.abs(x @ prototypes.T)
    top_v, idx = torch.topk(sim, top_k, dim=-1)
    full = torch.full_like(sim, float("-inf")).scatter(-1, idx, top_v)
    return torch.softmax(full / temperature, dim=-1)


def lora_delta_arrow(
    x: torch.Tensor, prototypes: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, top_k: int, temperature: float
) -> torch.Tensor:
    """x: (B, T, d_in); prototypes: (E, d_in); A: (E, r, d_in); Bt: (E, r, d_out), scale folded -> (B, T, d_out).

    The dense path with per-token weights: every expert's rank rows in one matmul, each token's Arrow
    coefficients as the mask, one matmul back (PEFT forms (tokens, E, d_out) instead).
    """
    e, r, d_in = A.shape
    coeff = arrow_coefficients(x, prototypes, top_k, temperature)  # (B, T, E)
    h = torch.matmul(x, A.reshape(e * r, d_in).T) * coeff.repeat_interleave(r, dim=-1)
    return torch.matmul(h, Bt.reshape(e * r, -1))


def lora_delta_arrow_loop(
    x: torch.Tensor,
    adapters: list[tuple[torch.Tensor, torch.Tensor, float]],
    prototypes: torch.Tensor,
    top_k: int,
    temperature: float,
) -> torch.Tensor:
    """Reference, token by token: delta[t] = sum over t's top_k experts e of c[t, e] * scale_e * B_e A_e x[t],
    c = softmax of |x[t] . p_e| / temperature over those k. x: (B, T, d_in); adapters[e]: (A_e, B_e, scale_e)."""
    out = torch.zeros(*x.shape[:-1], adapters[0][1].shape[0], dtype=x.dtype, device=x.device)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            sim = [abs(float(x[b, t] @ p)) for p in prototypes]
            best = sorted(range(len(sim)), key=lambda e: -sim[e])[:top_k]
            z = torch.softmax(torch.tensor([sim[e] for e in best], dtype=torch.float64) / temperature, 0)
            for e, c in zip(best, z.tolist()):
                A, B, scale = adapters[e]
                out[b, t] += c * scale * (B @ (A @ x[b, t]))
    return out
