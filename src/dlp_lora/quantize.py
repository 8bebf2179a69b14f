"""Quantized base weights: every nn.Linear of the frozen base model, LM head included, in int8.

`int8` is W8A8 with per-token dynamic activations: the weight is int8 per output channel (symmetric,
scale = max|w| / 127), each token's activation vector is quantized on the fly with its own scale, the
product runs as an int8 GEMM with int32 accumulation (torch's `torch._int_mm` CPU kernel) and is rescaled
to fp32. It is the scheme of torchao's `Int8DynamicActivationInt8WeightConfig`, run on torch's own kernel
because that config is 10-100x slower than fp32 in eager mode on CPU (benchmarks/int8_choice.py).

Why per token and not torch's `quantize_dynamic`: the latter quantizes the whole input tensor with one
scale, so a row's output would depend on the other rows of its batch (and on left padding), breaking
"a mixed batch equals its rows alone". Per token, the integer product is exact and each token's scale is
its own, so a row's output is bit-identical whatever it is batched with.

`auto` measures before it quantizes. Whether int8 is fast depends on the CPU: with VNNI (AVX512-VNNI,
AVX-VNNI) or AMX, `torch._int_mm` does int8 dot products in hardware and beats fp32 (it reads a quarter of
the weight bytes); on AVX2 without VNNI the same call is several times slower than fp32 (measured: 20 ms
against 0.5 ms at 32x576x1536 on an AMD EPYC). So at load `auto` times, for every distinct linear shape of
the model, fp32 `F.linear` against `Int8Linear` on this CPU at the thread count it will run with, and
quantizes only the shapes where int8 is clearly faster (`KernelChoice`); the choice and the times are
logged. An explicit `int8` quantizes everything, and warns when int8 measured slower than fp32 here. Both
first check that the int8 GEMM is exact on this CPU (`int8_gemm_exact`): where it is not, `auto` keeps
fp32 and `int8` is refused.

Decode on CPU is bound by reading the weights once per token; int8 reads a quarter of the bytes. The
tied input embedding stays fp32 (a lookup reads one row per token, so it costs no bandwidth) while the LM
head that shared its storage becomes an int8 copy. The LoRA branch is untouched: fused layers add their fp32
delta to the quantized layer's output, so every mixture is exact relative to the quantized base.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn

from dlp_lora.config import Quantization
from dlp_lora.hardware import cpu_info

__all__ = [
    "Quantization",
    "QUANTIZATIONS",
    "Int8Linear",
    "KernelChoice",
    "choose_kernels",
    "quantize_model",
    "check_quantization",
    "resolve_quantization",
    "int8_gemm_exact",
    "is_quantized_linear",
    "linear_features",
    "quantization_of",
]

QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)

_log = logging.getLogger(__name__)

TIMED_ROWS = (1, 8, 32)
"""Rows per timed call: a decode step at batch 1 and 8, and a chunk of prefill."""
INT8_MARGIN = 0.9
"""`auto` quantizes a shape only when int8 takes less than this fraction of fp32's time: a tie keeps fp32,
which is exact."""


class Int8Linear(nn.Module):
    """y = (q(x) @ W_q.T) * s_x * s_w + bias, with W_q int8 per output channel and q(x) int8 per token.

    Built from a float nn.Linear by :meth:`from_linear`; the float weight is not kept.
    """

    def __init__(self, weight_t: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight_t.shape
        # Buffers: they move with model.to() and are saved by state_dict, but are never trained.
        self.register_buffer("weight_t", weight_t)  # (d_in, d_out) int8, the layout _int_mm reads
        self.register_buffer("weight_scale", weight_scale)  # (d_out,) fp32
        self.register_buffer("bias", bias)  # (d_out,) fp32 or None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        return cls(q.T.contiguous(), scale, bias)

    def dequantized_weight(self) -> torch.Tensor:
        """(d_out, d_in) fp32: the weight this layer multiplies by (used by tests and references)."""
        return self.weight_t.T.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) fp32 -> (..., d_out) fp32."""
        x2 = x.reshape(-1, self.in_features)
        s_x = (x2.abs().amax(dim=1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # (M, 1)
        q_x = torch.round(x2 / s_x).clamp(-127, 127).to(torch.int8)
        y = torch._int_mm(q_x, self.weight_t).float() * (s_x * self.weight_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@dataclass(frozen=True)
class KernelChoice:
    """What `auto` measured for one linear shape on this CPU and what it chose."""

    d_in: int
    d_out: int
    layers: int
    """How many layers of the model have this shape."""
    fp32_ms: float
    """Wall ms of fp32 F.linear through all `layers` (each layer's fastest call), summed over TIMED_ROWS."""
    int8_ms: float
    """The same for Int8Linear (activation quantization included)."""

    @property
    def int8(self) -> bool:
        return self.int8_ms < INT8_MARGIN * self.fp32_ms

    def __str__(self) -> str:
        return (
            f"{self.d_in}->{self.d_out} x{self.layers}: fp32 {self.fp32_ms:.3f} ms, int8 {self.int8_ms:.3f} ms "
            f"-> {'int8' if self.int8 else 'fp32'}"
        )


def _sweep_ms(sweeps: list[list[Callable[[], object]]], rounds: int = 9) -> list[float]:
    """Each sweep is a list of calls (one per layer, in forward order); its time: the sum over its calls of
    each call's fastest of `rounds` rounds, every sweep run once per round.

    Call by call, and every sweep (all shapes, fp32 and int8) in each round: on a shared CPU (another process
    at load time, two torch thread teams on two cores) parallel regions now and then wait for a thread the
    scheduler took, for a few seconds at a time, and the int8 path (more, smaller regions) much more than
    one fp32 GEMM. Timing one shape's rounds back to back let such a spell cover all of them: with a
    training job beside it, `auto` flipped shapes to fp32 at random (576->576 int8 486 vs fp32 32 ms, where
    quiet it is 21 vs 31; the MLP's 297 vs 115 us per layer at batch 1). Spread over every round, a spell
    costs a round or two of each sweep and the fastest call of each layer is the kernel's own time."""
    with torch.no_grad():
        for calls in sweeps:  # warm-up: first-call allocations and kernel selection
            for call in calls:
                call()
        best = [[float("inf")] * len(calls) for calls in sweeps]
        for _ in range(rounds):
            for calls, times in zip(sweeps, best):
                for i, call in enumerate(calls):
                    t = time.perf_counter()
                    call()
                    times[i] = min(times[i], time.perf_counter() - t)
    return [1000 * sum(times) for times in best]


def choose_kernels(model: nn.Module, rows: tuple[int, ...] = TIMED_ROWS) -> list[KernelChoice]:
    """Time fp32 and int8 on this CPU for every distinct (d_in, d_out) of the model's nn.Linear layers.

    Each shape is timed through all of its layers in turn, as a forward pass meets them: one layer timed
    alone stays in cache and flatters fp32, whose weights are 4x the bytes. Random activations of each of
    `rows` tokens; wall time at torch's current thread count (the setting the model will run with).
    """
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    return _time_shapes(linears, [Int8Linear.from_linear(m) for m in linears], rows)


def _time_shapes(
    linears: list[nn.Linear], quantized: list[Int8Linear], rows: tuple[int, ...] = TIMED_ROWS
) -> list[KernelChoice]:
    shapes: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(linears):
        shapes.setdefault((m.in_features, m.out_features), []).append(i)
    g = torch.Generator().manual_seed(0)
    sweeps = []  # per shape, per row count: the fp32 sweep, then the int8 one
    for (d_in, _), idx in shapes.items():
        for m in rows:
            x = torch.randn(m, d_in, generator=g)
            sweeps.append([partial(F.linear, x, linears[i].weight, linears[i].bias) for i in idx])
            sweeps.append([partial(quantized[i], x) for i in idx])
    ms = iter(_sweep_ms(sweeps))
    out = []
    for (d_in, d_out), idx in shapes.items():
        fp32 = int8 = 0.0
        for _ in rows:
            fp32, int8 = fp32 + next(ms), int8 + next(ms)
        out.append(KernelChoice(d_in, d_out, len(idx), round(fp32, 4), round(int8, 4)))
    return out


def int8_gemm_exact() -> bool:
    """Whether `torch._int_mm` returns the exact int32 products on this CPU.

    It must: the scheme's exactness rests on it. Seen false with oneDNN limited to AVX2 (no VNNI), whose
    int8 kernel adds pairs of u8*s8 products in int16 with saturation (errors of 1e5 on 576-term sums).
    A 64x576 @ 576x256 product of random int8 values, checked against int64 arithmetic (about 1 ms).
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (64, 576), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (576, 256), generator=g, dtype=torch.int8)
    return torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long())


def resolve_quantization(scheme: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> str:
    """`auto` becomes `none` where int8 cannot run (not CPU, not float32); other schemes are checked."""
    if scheme == "auto" and (torch.device(device).type != "cpu" or dtype != torch.float32):
        return "none"
    check_quantization(scheme, dtype, device)
    return scheme


def check_quantization(scheme: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
    """Raise ValueError when `scheme` cannot run the model in `dtype` on `device` (`auto` always can: it
    measures on CPU in float32 and means `none` elsewhere)."""
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {list(QUANTIZATIONS)}, got {scheme!r}")
    if scheme in ("none", "auto"):
        return
    if torch.device(device).type != "cpu":
        raise ValueError(
            f"quantize={scheme!r} runs on CPU only (torch's int8 GEMM kernel), got device "
            f"{torch.device(device)}; use quantize='none' on {torch.device(device).type}"
        )
    if dtype != torch.float32:
        raise ValueError(
            f"quantize={scheme!r} needs the base model in torch.float32 (its int8 kernels take and "
            f"return fp32 activations), got {dtype}"
        )


def quantize_model(model: nn.Module, scheme: Quantization = "int8") -> nn.Module:
    """Replace every nn.Linear of `model` (LM head included) by an :class:`Int8Linear`, in place; return it.

    `auto`: only the layers whose shape `choose_kernels` found faster in int8 on this CPU (none elsewhere
    than a float32 model on CPU). The model must be fp32 on CPU and not fused (quantize first, then build
    `FusedLoRAModel`). A tied input embedding keeps its fp32 weight; only the head's copy is quantized.
    """
    params = list(model.parameters())
    dtype = params[0].dtype if params else torch.float32
    device = params[0].device if params else torch.device("cpu")
    scheme = resolve_quantization(scheme, dtype, device)
    if scheme == "none":
        return model
    if any(is_quantized_linear(m) for m in model.modules()):
        raise ValueError("this model is already quantized")
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    odd = sorted({type(m).__name__ for _, m in linears if type(m) is not nn.Linear})
    # A linear held as `.base` / `.base_layer` is wrapped by our fused layer or by peft, whose wrapper
    # keeps a reference to it: swapping it out from under the wrapper would corrupt the wrapper's restore.
    wrapped = [name for name, _ in linears if name.rpartition(".")[2] in ("base", "base_layer")]
    if odd or wrapped:
        raise TypeError(
            f"quantize_model needs a bare model with plain nn.Linear layers, found "
            f"{f'subclasses {odd}' if odd else f'wrapped layers such as {wrapped[0]!r}'} "
            "(quantize the base model before fusing or wrapping it)"
        )
    quantized = [Int8Linear.from_linear(m) for _, m in linears]
    keep = _int8_shapes(scheme, [m for _, m in linears], quantized)
    for (name, linear), q in zip(linears, quantized):
        if (linear.in_features, linear.out_features) in keep:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, q)
    return model


def _int8_shapes(scheme: str, linears: list[nn.Linear], quantized: list[Int8Linear]) -> set[tuple[int, int]]:
    """The (d_in, d_out) shapes to hold in int8: all for `int8`, those measured faster for `auto`; none (auto)
    or an error (int8) where the int8 GEMM is inexact. What was measured and chosen is logged."""
    if not int8_gemm_exact():
        if scheme == "int8":
            raise ValueError(
                f"quantize='int8': torch's int8 GEMM (torch._int_mm) returns wrong products on this "
                f"CPU ({cpu_info()}); use quantize='auto' (fp32 here) or 'none'"
            )
        _log.info("quantize auto on %s: fp32, torch's int8 GEMM returns wrong products here", cpu_info())
        return set()
    choices = _time_shapes(linears, quantized)
    if scheme == "int8":
        if sum(c.int8_ms for c in choices) > sum(c.fp32_ms for c in choices):
            _log.warning(
                "quantize int8: int8 kernels measured slower than fp32 on %s (%s); `auto` quantizes "
                "only the shapes where int8 is faster",
                cpu_info(),
                "; ".join(map(str, choices)),
            )
        return {(c.d_in, c.d_out) for c in choices}
    keep = {(c.d_in, c.d_out) for c in choices if c.int8}
    _log.info(
        "quantize auto on %s: int8 for %d of %d linear shapes (%s)",
        cpu_info(),
        len(keep),
        len(choices),
        "; ".join(map(str, choices)),
    )
    return keep


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a linear layer whose weight lives in int8 (no float `.weight` to merge into)."""
    return isinstance(module, Int8Linear)


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a float or quantized linear layer, None for anything else."""
    if isinstance(module, (nn.Linear, Int8Linear)):
        return module.in_features, module.out_features
    return None


def quantization_of(model: nn.Module) -> Quantization:
    """The scheme a model was quantized with: `int8` if any layer is, else `none`."""
    return "int8" if any(is_quantized_linear(m) for m in model.modules()) else "none"
