"""Fused multi-LoRA against peft and against the per-row loop reference, in float32 and bfloat16
(the `dtype` fixture; tolerance `conftest.ATOL`) with the device check on around every fused call."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import ATOL, DTYPES, assert_close, dtype_id, generate_ids, make_peft_adapter, padded_ids, tiny_llama
from devcheck import device_checked
from peft import PeftModel

from dlp_lora import FusedLoRAModel
from dlp_lora.adapters.bank import AdapterBank
from dlp_lora.config import FusionConfig, GenerationConfig
from dlp_lora.fusion import ops
from dlp_lora.types import Routing

PATHS = ["gathered", "dense", "merged"]
# Against peft, float16 too: its tolerance is stated beside the others (conftest.ATOL).
PEFT_DTYPES = pytest.mark.parametrize("dtype", [*DTYPES, torch.float16], ids=dtype_id)


def _peft(adapter_dirs, mix: dict[str, float], dtype: torch.dtype = torch.float32) -> PeftModel:
    """peft over the same tiny base in `dtype`, serving one adapter or a `cat` mixture of several."""
    names = list(mix)
    ref = PeftModel.from_pretrained(tiny_llama(dtype=dtype), adapter_dirs[names[0]], adapter_name=names[0]).eval()
    for name in names[1:]:
        ref.load_adapter(adapter_dirs[name], adapter_name=name)
    if len(names) > 1 or mix[names[0]] != 1.0:
        ref.add_weighted_adapter(names, list(mix.values()), adapter_name="mix", combination_type="cat")
        ref.set_adapter("mix")
    return ref


def _logits(model, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _fused_logits(fused: FusedLoRAModel, weights, ids, mask=None, path: str | None = None) -> torch.Tensor:
    """The fused model's logits under `weights`, every op device-checked; `path` asserts the path taken."""
    with device_checked(fused.device), fused.routed(weights) as active:
        got = _logits(fused.model, ids, mask)
    assert path is None or active.path == path
    return got


@PEFT_DTYPES
@pytest.mark.parametrize("path", PATHS)
def test_single_adapter_equals_peft(adapter_dirs, path, dtype):
    ids, mask = padded_ids()
    want = _logits(_peft(adapter_dirs, {"c": 1.0}, dtype), ids, mask)
    fused = FusedLoRAModel(tiny_llama(dtype=dtype), adapter_dirs, FusionConfig(path=path))
    assert_close(_fused_logits(fused, torch.tensor([[0.0, 0.0, 1.0]] * 3), ids, mask, path), want)


@PEFT_DTYPES
def test_mixture_equals_peft_cat_weighted_adapter(adapter_dirs, dtype):
    ids, mask = padded_ids()
    mix = {"a": 0.7, "b": 0.2, "c": 0.5}
    want = _logits(_peft(adapter_dirs, mix, dtype), ids, mask)
    fused = FusedLoRAModel(tiny_llama(dtype=dtype), adapter_dirs)
    for path in PATHS:
        fused.config = FusionConfig(path=path)
        assert_close(
            _fused_logits(fused, torch.tensor([list(mix.values())] * 3), ids, mask, path), want, f"path {path}"
        )


def _mixed_weights() -> torch.Tensor:
    return torch.tensor([[1.0, 0.0, 0.0], [0.3, 0.7, 0.0], [0.0, 0.0, 0.0]])  # a, a+b, base


@PEFT_DTYPES
@pytest.mark.parametrize("path", ["gathered", "dense"])
def test_mixed_batch_rows_equal_peft(adapter_dirs, path, dtype):
    ids, mask = padded_ids()
    fused = FusedLoRAModel(tiny_llama(dtype=dtype), adapter_dirs, FusionConfig(path=path))
    got = _fused_logits(fused, _mixed_weights(), ids, mask, path)
    refs = [_peft(adapter_dirs, {"a": 1.0}, dtype), _peft(adapter_dirs, {"a": 0.3, "b": 0.7}, dtype)]
    with refs[0].disable_adapter():
        base = _logits(refs[0], ids, mask)
    want = [_logits(refs[0], ids, mask)[0], _logits(refs[1], ids, mask)[1], base[2]]
    for b in range(3):
        keep = mask[b].bool()
        assert_close(got[b, keep], want[b][keep], f"row {b}")


@pytest.mark.parametrize("path", ["gathered", "dense"])
def test_mixed_batch_equals_rows_alone(adapter_dirs, path, dtype):
    ids, mask = padded_ids()
    weights = _mixed_weights()
    fused = FusedLoRAModel(tiny_llama(dtype=dtype), adapter_dirs, FusionConfig(path=path))
    batch = _fused_logits(fused, weights, ids, mask, path)
    fused.config = FusionConfig()
    for b in range(3):
        keep = mask[b].bool()
        assert_close(batch[b, keep], _fused_logits(fused, weights[b : b + 1], ids[b : b + 1, keep])[0])


class _FakeTokenizer:
    """Just what generate_ids needs from a tokenizer, for a model without a real vocabulary."""

    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _greedy(fused: FusedLoRAModel, weights, ids, mask, steps: int) -> list[list[int]]:
    with device_checked(fused.device), fused.routed(weights):
        out = generate_ids(fused.model, _FakeTokenizer(), ids, mask, GenerationConfig(max_new_tokens=steps))
    return [row.token_ids for row in out]


def test_mixed_batch_greedy_tokens_equal_rows_alone(adapter_dirs, dtype):
    ids, mask = padded_ids()
    weights = _mixed_weights()
    fused = FusedLoRAModel(tiny_llama(dtype=dtype), adapter_dirs)
    batch = _greedy(fused, weights, ids, mask, 8)
    with fused.routed(weights):  # transformers' own loop over the same fused model (outside the check)
        hf = fused.model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    for b in range(3):
        keep = mask[b].bool()
        alone = _greedy(fused, weights[b : b + 1], ids[b : b + 1, keep], mask[b : b + 1, keep], 8)[0]
        assert batch[b] == alone
        assert hf[b, ids.shape[1] :].tolist() == alone


def test_greedy_generation_equals_peft(adapter_dirs, dtype):
    ids, mask = padded_ids()
    ref = _peft(adapter_dirs, {"b": 1.0}, dtype)
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    fused = FusedLoRAModel(tiny_llama(dtype=dtype), adapter_dirs)
    assert _greedy(fused, torch.tensor([[0.0, 1.0, 0.0]] * 3), ids, mask, 6) == want[:, ids.shape[1] :].tolist()


def test_all_paths_equal_loop_reference(tiny_model, adapter_dirs):
    """The ops alone, in float32 only: over a half-precision base the layer casts x up and the stacks stay
    float32 (test_device), so the ops never see another dtype; the whole-model tests cover bfloat16."""
    atol = ATOL[torch.float32]
    bank = AdapterBank(tiny_model, adapter_dirs)
    g = torch.Generator().manual_seed(1)
    weights = torch.rand(4, 3, generator=g) * (torch.rand(4, 3, generator=g) > 0.3)
    for name, stack in bank.modules.items():
        x = torch.randn(4, 5, stack.A.shape[-1], generator=g)
        terms = [(w.A, w.B, w.scale) if (w := a.modules.get(name)) else None for a in bank.adapters]
        want = ops.lora_delta_loop(x, terms, weights, stack.Bt.shape[-1])
        routing = Routing.from_dense(weights)
        A_sel, Bt_sel = ops.gather_stacks(stack.A, stack.Bt, routing.indices, routing.weights)
        torch.testing.assert_close(ops.lora_delta_gathered(x, A_sel, Bt_sel), want, atol=atol, rtol=0)
        mask = ops.dense_mask(weights, stack.rank)
        torch.testing.assert_close(ops.lora_delta_dense(x, stack.A, stack.Bt, mask), want, atol=atol, rtol=0)
        W = torch.randn(stack.Bt.shape[-1], stack.A.shape[-1], generator=g)
        merged = ops.merged_weight(W, stack.A, stack.Bt, weights[0])
        ref = x @ W.T + ops.lora_delta_loop(x, terms, weights[:1].expand(4, 3), stack.Bt.shape[-1])
        torch.testing.assert_close(x @ merged.T, ref, atol=atol, rtol=0, msg=name)


def test_model_level_paths_equal_each_row_alone_under_peft(adapter_dirs, dtype):
    """Whole-model logits of every path, mixed and uniform batches, against each row run alone (unpadded)
    through peft's own `cat` combination of that row's mixture (a zero row: the plain base model), so the
    reference shares no code with the fused layers."""
    ids, mask = padded_ids()
    uniform = torch.tensor([[0.5, 0.25, 1.0]]).repeat(3, 1)
    mixed = _mixed_weights()
    fused = FusedLoRAModel(tiny_llama(dtype=dtype), adapter_dirs)
    refs: dict[tuple, torch.Tensor] = {}
    for path, w in [("gathered", mixed), ("dense", mixed), ("gathered", uniform), ("merged", uniform)]:
        fused.config = FusionConfig(path=path)
        got = _fused_logits(fused, w, ids, mask, path)
        for b in range(3):
            keep = mask[b].bool()
            mix = {name: float(x) for name, x in zip(adapter_dirs, w[b]) if x > 0}
            key = (tuple(mix.items()), b)
            if key not in refs:
                ref = _peft(adapter_dirs, mix, dtype) if mix else tiny_llama(dtype=dtype)
                refs[key] = _logits(ref, ids[b : b + 1, keep])[0]
            assert_close(got[b, keep], refs[key], f"{path} row {b}")


def test_auto_path_choice(tiny_model, adapter_dirs):
    # Ranks a 4, b 2, c 8: the bank's gathered path reads k * 8 rank rows per row.
    fused = FusedLoRAModel(tiny_model, adapter_dirs, FusionConfig(dense_max_rank=0))
    one_each = torch.eye(3)  # k = 1, every adapter used: dense would read 14 rank rows, gathered 8
    cases = [
        (torch.zeros(2, 3), "base"),
        (torch.tensor([[1.0, 0, 0]] * 2), "merged"),
        (_mixed_weights(), "dense"),  # k = 2, a and b used: 6 rank rows dense, 16 gathered
        (one_each, "gathered"),
    ]
    for w, want in cases:
        with fused.routed(w) as active:
            assert active.path == want
    fused.config = FusionConfig(dense_max_rank=1000)
    with fused.routed(one_each) as active:
        assert active.path == "dense"


def test_unpinned_paths_compute_only_routed_rows_and_used_adapters(tiny_model, adapter_dirs):
    """A base row (row 2) and an adapter no row uses (c) enter neither path's delta; pinned, both do."""
    fused = FusedLoRAModel(tiny_model, adapter_dirs)
    q = next(layer for layer in fused._layers if layer.name.endswith("0.self_attn.q_proj"))  # a: 4, b: 2
    v = next(layer for layer in fused._layers if layer.name.endswith("0.self_attn.v_proj"))  # a: 4, c: 8
    for path in ("dense", "gathered"):
        fused.config = FusionConfig(path=path)
        with fused.routed(_mixed_weights()) as active:
            assert active.rows.tolist() == [0, 1]
            if path == "dense":
                A, Bt, mask = q.prepare(active)
                assert A.shape[0] == Bt.shape[0] == 6 and mask.shape == (2, 6)
                assert v.prepare(active)[0].shape[0] == 4  # c's 8 rows left out
            else:
                assert q.prepare(active)[0].shape[0] == 2
    for pinned in ("dense", "gathered"):
        with fused.routed(_mixed_weights(), path=pinned) as active:
            assert active.rows is None
            if pinned == "dense":
                assert q.prepare(active)[2].shape == (3, 4 + 2)  # every row's mask over every rank row
            else:
                assert q.prepare(active)[0].shape[0] == 3


def test_zero_row_is_base_model(adapter_dirs, dtype):
    model = tiny_llama(dtype=dtype)
    ids, mask = padded_ids()
    base = _logits(model, ids, mask)
    got = _fused_logits(FusedLoRAModel(model, adapter_dirs), _mixed_weights(), ids, mask)
    assert torch.equal(got[2], base[2])


def test_remove_restores_bit_for_bit(adapter_dirs, dtype):
    model = tiny_llama(dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = padded_ids()
    want = _logits(model, ids, mask)
    fused = FusedLoRAModel(model, adapter_dirs)
    for path in PATHS:  # the merged path must leave no trace in W either
        fused.config = FusionConfig(path=path)
        _fused_logits(fused, torch.ones(3, 3), ids, mask, path)
    fused.remove()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_logits(model, ids, mask), want)
    with pytest.raises(RuntimeError, match="removed"):
        with fused.routed(torch.ones(1, 3)):
            pass


def test_adapter_names_in_bank_order(tiny_model, adapter_dirs):
    fused = FusedLoRAModel(tiny_model, {"c": adapter_dirs["c"], "a": adapter_dirs["a"]})
    assert fused.adapter_names == ["c", "a"]


# ---- errors -------------------------------------------------------------------------------------------


def test_weights_errors(tiny_model, adapter_dirs):
    fused = FusedLoRAModel(tiny_model, adapter_dirs)
    bad = [
        (torch.tensor([[1.0, -0.1, 0.0]]), ValueError, ">= 0"),
        (torch.ones(2, 2), ValueError, r"shape \(B, 3\)"),
        (torch.ones(3), ValueError, r"shape \(B, 3\)"),
        (torch.ones(2, 3, dtype=torch.long), TypeError, "float tensor"),
        ([[1.0, 0.0, 0.0]], TypeError, "float tensor"),
        (torch.tensor([[float("nan"), 0.0, 0.0]]), ValueError, "finite"),
    ]
    for w, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            with fused.routed(w):
                pass
    assert fused.active_path is None  # a refused routing leaves nothing behind


def test_nested_routing_refused(tiny_model, adapter_dirs):
    fused = FusedLoRAModel(tiny_model, adapter_dirs)
    with fused.routed(torch.ones(1, 3)):
        with pytest.raises(RuntimeError, match="already set"):
            with fused.routed(torch.ones(1, 3)):
                pass
    assert fused.active_path is None


def test_batch_size_mismatch_refused(tiny_model, adapter_dirs):
    fused = FusedLoRAModel(tiny_model, adapter_dirs)
    ids, mask = padded_ids(b=2)
    with fused.routed(_mixed_weights()), pytest.raises(ValueError, match="batch of 3 rows"):
        tiny_model(input_ids=ids, attention_mask=mask)


def test_forced_merged_with_mixed_rows_refused(tiny_model, adapter_dirs):
    fused = FusedLoRAModel(tiny_model, adapter_dirs, FusionConfig(path="merged"))
    with pytest.raises(ValueError, match="share one mixture"):
        with fused.routed(_mixed_weights()):
            pass


@pytest.mark.parametrize("path", ["dense", "gathered"])
def test_a_pinned_path_runs_whatever_the_weights_and_is_prepared_at_once(tiny_model, adapter_dirs, path):
    """What the compiled slots need: zero rows stay on the pinned path (not `base`), gathered keeps k >= 2,
    every layer's tensors exist before the first forward, and outputs equal the path auto chooses."""
    ids, mask = padded_ids(3, 6)
    weights = _mixed_weights()
    weights[1] = 0  # a base-model row among mixtures
    with torch.no_grad():
        fused = FusedLoRAModel(tiny_model, adapter_dirs)
        with fused.routed(weights):
            want = tiny_model(input_ids=ids, attention_mask=mask).logits
        with fused.routed(weights, path=path) as active:
            assert active.path == path and len(active.prepared) == len(fused.bank.modules)
            assert path == "dense" or active.indices.shape[1] >= 2
            got = tiny_model(input_ids=ids, attention_mask=mask).logits
        with fused.routed(torch.zeros_like(weights), path=path) as active:
            assert active.path == path
            base = tiny_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    fused.remove()
    torch.testing.assert_close(base, tiny_model(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)


def test_a_pinned_path_must_be_dense_or_gathered(tiny_model, adapter_dirs):
    fused = FusedLoRAModel(tiny_model, adapter_dirs)
    with pytest.raises(ValueError, match="pinned path must be one of"):
        with fused.routed(_mixed_weights(), path="merged"):
            pass


def test_bin_adapter_refused(tiny_model, adapter_dirs, tmp_path):
    d = tmp_path / "bin"
    shutil.copytree(adapter_dirs["a"], d)
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(ValueError, match="only safetensors"):
        FusedLoRAModel(tiny_model, {"bin": d})


def test_missing_adapter_dir(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a PEFT adapter directory"):
        FusedLoRAModel(tiny_model, {"x": tmp_path / "nope"})


def test_shape_mismatch_names_adapter_module_and_shapes(tiny_model, tmp_path):
    other = tiny_llama()
    other.config.hidden_size = 32
    wide = make_peft_adapter(tmp_path / "wide", seed=3, base=_wider_llama())
    with pytest.raises(
        ValueError,
        match=r"adapter 'wide', module 'model\.layers\.0\.self_attn\.q_proj': "
        r"expected lora_A \(4, 32\).*found \(4, 48\)",
    ):
        FusedLoRAModel(tiny_model, {"wide": wide})


def _wider_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg)


def test_unknown_module_refused(tiny_model, adapter_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "renamed"
    shutil.copytree(adapter_dirs["a"], d)
    f = d / "adapter_model.safetensors"
    tensors = {k.replace("layers.0.", "layers.9."): v for k, v in load_file(str(f)).items()}
    save_file(tensors, str(f))
    with pytest.raises(ValueError, match=r"module 'model\.layers\.9\.self_attn\.q_proj' does not exist"):
        FusedLoRAModel(tiny_model, {"renamed": d})


@pytest.mark.parametrize(
    "key,value,msg",
    [("use_dora", True, "DoRA"), ("peft_type", "IA3", "peft_type LORA"), ("bias", "all", "bias 'none'")],
)
def test_unsupported_config_refused(tiny_model, adapter_dirs, tmp_path, key, value, msg):
    d = tmp_path / "cfg"
    shutil.copytree(adapter_dirs["a"], d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg[key] = value
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=msg):
        FusedLoRAModel(tiny_model, {"cfg": d})


def test_double_fusion_refused(tiny_model, adapter_dirs):
    FusedLoRAModel(tiny_model, adapter_dirs)
    with pytest.raises(ValueError, match="already fused"):
        FusedLoRAModel(tiny_model, adapter_dirs)


def test_empty_bank_refused(tiny_model):
    with pytest.raises(ValueError, match="at least one adapter"):
        FusedLoRAModel(tiny_model, {})


def _decode(model, ids, mask, steps, on_step=None):
    """Greedy prefill + `steps` decode steps with a KV cache; on_step(i) runs before decode step i."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    logits = [out.logits[:, -1]]
    for i in range(steps):
        if on_step is not None:
            on_step(i)
        token = logits[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=out.cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("path", PATHS)
def test_reroute_mid_decode_equals_two_blocks_on_one_cache(adapter_dirs, path, dtype):
    """A row switched at step t equals a run of t steps under mixture 1, then mixture 2 on the same cache."""
    ids, mask = padded_ids()
    first = _mixed_weights()
    second = first.clone()
    second[1] = torch.tensor([0.0, 0.2, 0.9])  # only row 1 switches
    if path == "merged":  # one shared mixture: a batch of one row
        ids, mask, first, second = ids[:1], mask[:1], first[:1], torch.tensor([[0.0, 0.2, 0.9]])
    model = tiny_llama(dtype=dtype)
    fused = FusedLoRAModel(model, adapter_dirs, FusionConfig(path=path))
    t = 3
    with device_checked(), torch.no_grad(), fused.routed(first):
        switched = _decode(model, ids, mask, 6, lambda i: fused.reroute(second) if i == t else None)
        assert fused.active_path == path
    for b in range(ids.shape[0]):
        keep = mask[b].bool()
        blocks = [fused.routed(first[b : b + 1])]  # reference: two routed blocks sharing one KV cache
        blocks[0].__enter__()

        def hop(i):
            if i == t:
                blocks[-1].__exit__(None, None, None)
                blocks.append(fused.routed(second[b : b + 1]))
                blocks[-1].__enter__()

        try:
            with device_checked(), torch.no_grad():
                alone = _decode(model, ids[b : b + 1, keep], mask[b : b + 1, keep], 6, hop)
        finally:
            blocks[-1].__exit__(None, None, None)
        assert_close(switched[b], alone[0])
    fused.remove()


def test_reroute_outside_routed_refused(tiny_model, adapter_dirs):
    fused = FusedLoRAModel(tiny_model, adapter_dirs)
    with pytest.raises(RuntimeError, match="inside a `with fused.routed"):
        fused.reroute(torch.ones(1, 3))
    with fused.routed(torch.ones(1, 3)):
        fused.reroute(torch.zeros(2, 3))  # rows may join or leave
        assert fused.active_path == "base"
    assert fused.active_path is None
    fused.remove()
