"""A mixture exported as one PEFT adapter, loaded by peft, equals the fused model on that mixture."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from peft import PeftModel

from dlp_lora import FusedLoRAModel
from dlp_lora.adapters.io import read_peft_adapter, write_peft_adapter
from dlp_lora.adapters.mix import mix_adapters, parse_mix
from dlp_lora.assets import Manifest
from dlp_lora.export import export_mixture


def test_parse_mix():
    assert parse_mix("a=0.7, b=0.3") == {"a": 0.7, "b": 0.3}
    for bad, msg in [
        ("a", "NAME=WEIGHT"),
        ("a=x", "NAME=WEIGHT"),
        ("a=-1", "NAME=WEIGHT"),
        ("a=0", "positive"),
        ("a=1,a=2", "twice"),
        ("", "positive"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_mix(bad)


def test_exported_mixture_matches_fused(tmp_path, adapter_dirs):
    mix = {"a": 0.6, "b": 0.0, "c": 0.9}
    root = tmp_path / "assets"
    Manifest(base_model="tiny", tasks=list(adapter_dirs), adapters={n: str(p) for n, p in adapter_dirs.items()}).save(
        root
    )
    out = export_mixture(root, mix, tmp_path / "mix")
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = PeftModel.from_pretrained(tiny_llama(), out).eval()(input_ids=ids).logits
    model = tiny_llama()
    fused = FusedLoRAModel(model, adapter_dirs)
    with torch.no_grad(), fused.routed(torch.tensor([[0.6, 0.0, 0.9]] * 2)):
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_mix_of_different_ranks_round_trips(tmp_path, adapter_dirs):
    adapters = {n: read_peft_adapter(p, n) for n, p in adapter_dirs.items()}
    mixed = mix_adapters(adapters, {"a": 1.0, "c": 0.5})
    write_peft_adapter(tmp_path / "m", mixed, "tiny", dtype=torch.float32)
    back = read_peft_adapter(tmp_path / "m")
    # v_proj is targeted by a (r=4) and c (r=8): the mixture has rank 12 there, 4 on q_proj
    assert back.modules["model.layers.0.self_attn.v_proj"].rank == 12
    assert back.modules["model.layers.0.self_attn.q_proj"].rank == 4
    for module, w in back.modules.items():
        x = torch.randn(3, w.A.shape[1])
        ref = sum(
            m * (x @ t.A.T @ t.B.T) * t.scale
            for name, m in (("a", 1.0), ("c", 0.5))
            if (t := adapters[name].modules.get(module))
        )
        torch.testing.assert_close(w.scale * (x @ w.A.T @ w.B.T), ref, atol=1e-5, rtol=0)


def test_unknown_adapter_in_mix(tmp_path, adapter_dirs):
    root = tmp_path / "assets"
    Manifest(base_model="tiny", tasks=list(adapter_dirs), adapters={n: str(p) for n, p in adapter_dirs.items()}).save(
        root
    )
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zzz'\]"):
        export_mixture(root, {"zzz": 1.0}, tmp_path / "x")
