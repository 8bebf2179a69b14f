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

Decode on CPU is bound by reading the weights once per token; int8 reads a quarter of the bytes. The
tied input embedding stays fp32 (a lookup reads one row per token, so it costs no bandwidth) while the LM
head that shared its storage becomes an int8 copy. The LoRA branch is untouched: fused layers add their fp32
delta to the quantized layer's output, so every mixture is exact relative to the quantized base.
"""

from __future__ import annotations

from typing import get_args

import torch
from torch import nn

from dlp_lora.config import Quantization

__all__ = ["Quantization", "QUANTIZATIONS", "Int8Linear", "quantize_model", "check_quantization",
           "is_quantized_linear", "linear_features", "quantization_of"]

QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)


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
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
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


def check_quantization(scheme: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
    """Raise ValueError when `scheme` cannot run the model in `dtype` on `device`."""
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {list(QUANTIZATIONS)}, got {scheme!r}")
    if scheme == "none":
        return
    if torch.device(device).type != "cpu":
        raise ValueError(f"quantize={scheme!r} runs on CPU only (torch's int8 GEMM kernel), got device "
                         f"{torch.device(device)}; use quantize='none' on {torch.device(device).type}")
    if dtype != torch.float32:
        raise ValueError(f"quantize={scheme!r} needs the base model in torch.float32 (its int8 kernels take and "
                         f"return fp32 activations), got {dtype}")


def quantize_model(model: nn.Module, scheme: Quantization = "int8") -> nn.Module:
    """Replace every nn.Linear of `model` (LM head included) by an :class:`Int8Linear`, in place; return it.

    The model must be fp32 on CPU and not fused (quantize first, then build `FusedLoRAModel`). A tied
    input embedding keeps its fp32 weight; only the head's copy is quantized.
    """
    params = list(model.parameters())
    dtype = params[0].dtype if params else torch.float32
    device = params[0].device if params else torch.device("cpu")
    check_quantization(scheme, dtype, device)
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
        raise TypeError(f"quantize_model needs a bare model with plain nn.Linear layers, found "
                        f"{f'subclasses {odd}' if odd else f'wrapped layers such as {wrapped[0]!r}'} "
                        "(quantize the base model before fusing or wrapping it)")
    for name, linear in linears:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, Int8Linear.from_linear(linear))
    return model


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
