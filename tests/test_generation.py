"""The decode loop (`Engine.generate`, through conftest's `generate_ids`): greedy equals transformers'
generate, EOS and stop strings end rows, sampling is seeded, stop strings are found incrementally.

Each decoding test runs in float32 and bfloat16 (the `dtype` fixture) with the device check on."""

from __future__ import annotations

import pytest
import torch
from conftest import generate_ids, tiny_llama
from devcheck import device_checked

from dlp_lora.config import GenerationConfig
from dlp_lora.sampling import cut_at_stop, sample_next, stop_reached


class _Tok:
    """The tokenizer surface generate_ids uses; token t decodes to 't<t> '."""

    pad_token_id = 0

    def __init__(self, eos: int | None = None) -> None:
        self.eos_token_id = eos

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"t{i} " for i in ids)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[0, 0, 5, 9, 17], [3, 4, 8, 2, 11]])
    return ids, (ids != 0).long()


def _model(dtype: torch.dtype = torch.float32):
    model = tiny_llama(dtype=dtype)
    model.generation_config.eos_token_id = None  # only the tokenizer's EOS (set per test) ends rows
    return model


def _generate(model, tok, ids, mask, cfg, **kw):
    """generate_ids with every op it runs device-checked."""
    with device_checked(model.device):
        return generate_ids(model, tok, ids, mask, cfg, **kw)


def test_greedy_equals_hf_generate_with_left_padding(dtype):
    model, (ids, mask) = _model(dtype), _batch()
    out = _generate(model, _Tok(), ids, mask, GenerationConfig(max_new_tokens=6))
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    for b in range(2):
        assert out[b].token_ids == hf[b, ids.shape[1] :].tolist()
        assert out[b].finish_reason == "length" and out[b].prompt_tokens == int(mask[b].sum())


def test_eos_ends_only_its_row(dtype):
    model, (ids, mask) = _model(dtype), _batch()
    free = _generate(model, _Tok(), ids, mask, GenerationConfig(max_new_tokens=6))
    eos = free[0].token_ids[2]  # row 0's third token becomes its EOS
    out = _generate(model, _Tok(eos=eos), ids, mask, GenerationConfig(max_new_tokens=6))
    assert out[0].token_ids == free[0].token_ids[:2] and out[0].finish_reason == "stop"
    cut = free[1].token_ids.index(eos) if eos in free[1].token_ids else 6
    assert out[1].token_ids == free[1].token_ids[:cut]


def test_stop_string_cuts_text_and_ends_row(dtype):
    model, (ids, mask) = _model(dtype), _batch()
    free = _generate(model, _Tok(), ids, mask, GenerationConfig(max_new_tokens=6))
    stop = f"t{free[0].token_ids[1]} "
    out = _generate(model, _Tok(), ids, mask, GenerationConfig(max_new_tokens=6, stop=(stop,)))
    assert out[0].text == free[0].text[: free[0].text.find(stop)] and out[0].finish_reason == "stop"
    assert stop not in out[0].text
    assert cut_at_stop("abcXYdef", ("XY", "d")) == ("abc", True) and cut_at_stop("abc", ("z",)) == ("abc", False)


def test_sampling_is_seeded_and_streams_steps(dtype):
    model, (ids, mask) = _model(dtype), _batch()
    cfg = GenerationConfig(max_new_tokens=5, do_sample=True, temperature=1.5, seed=7)
    steps = []
    a = _generate(model, _Tok(), ids, mask, cfg, on_step=lambda tok, fin: steps.append(tok.tolist()))
    b = _generate(model, _Tok(), ids, mask, cfg)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [s[0] for s in steps] == a[0].token_ids
    other = _generate(
        model, _Tok(), ids, mask, GenerationConfig(max_new_tokens=5, do_sample=True, seed=8, temperature=1.5)
    )
    assert [r.token_ids for r in other] != [r.token_ids for r in a]


def test_sample_next_top_p_keeps_the_nucleus_only(dtype):
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).to(dtype)  # the model's dtype reaches it
    cfg = GenerationConfig(do_sample=True, top_p=0.7)
    g = torch.Generator().manual_seed(0)
    with device_checked():
        drawn = {int(sample_next(logits, cfg, g)) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.7: tokens 2 and 3 are never drawn
    assert int(sample_next(logits, GenerationConfig(), None)) == 0


def test_bad_inputs_refused():
    for kwargs, match in [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": 1e-9}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"stop": ("",)}, "stop"),
        ({"seed": 2**70}, "seed"),
    ]:
        with pytest.raises(ValueError, match=match):
            GenerationConfig(**kwargs)


def test_ignore_eos_decodes_to_max_new_tokens():
    model, (ids, mask) = _model(), _batch()
    free = _generate(model, _Tok(), ids, mask, GenerationConfig(max_new_tokens=6))
    eos = free[0].token_ids[0]  # row 0's first token is EOS: it would end at once
    assert _generate(model, _Tok(eos=eos), ids, mask, GenerationConfig(max_new_tokens=6))[0].token_ids == []
    out = _generate(model, _Tok(eos=eos), ids, mask, GenerationConfig(max_new_tokens=6, ignore_eos=True))
    assert [o.token_ids for o in out] == [o.token_ids for o in free]
    assert all(o.finish_reason == "length" for o in out)


def test_stop_strings_are_found_on_the_answers_tail_as_on_its_whole_text():
    """`stop_reached` decodes only the tail a new token can complete a stop string in; on the real
    tokenizer (byte-level BPE: multi-byte characters span tokens) it agrees with decoding everything."""
    from dlp_lora.models import load_tokenizer

    tok = load_tokenizer()
    text = "Réponse: 42 ✓ done.\n\nQ: naïve café ünïcode → ok ✓✓ end" * 3
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for stop in [("\n\n",), ("✓✓",), ("ünïcode →",), ("Q:", "end"), ("absent",)]:
        found_at = next((n for n in range(1, len(ids) + 1) if cut_at_stop(tok.decode(ids[:n]), stop)[1]), None)
        incremental = next((n for n in range(1, len(ids) + 1) if stop_reached(tok, ids[:n], stop)), None)
        assert incremental == found_at, stop
