"""GrowingCache: the same keys, values and logits as transformers' DynamicCache, without a copy per step."""

from __future__ import annotations

import torch
from conftest import padded_ids, tiny_llama
from transformers import DynamicCache

from dlp_lora.kvcache import HEADROOM, GrowingCache


def _decode(model, cache, ids, mask, steps: int, edit=None) -> list[torch.Tensor]:
    """Prefill then `steps` greedy steps on `cache`; `edit(cache, step)` may replace its tensors between steps
    and returns how many columns it trimmed on the left (the mask follows). Returns each pass's last logits."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        logits, pos = [out.logits[:, -1]], positions[:, -1:]
        for step in range(steps):
            if edit is not None:
                mask = mask[:, edit(out.cache, step) :]
            mask, pos = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1), pos + 1
            tokens = logits[-1].argmax(-1, keepdim=True)
            out = model(input_ids=tokens, attention_mask=mask, position_ids=pos, cache=out.cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return logits


def test_equals_dynamic_cache_past_its_headroom():
    model, (ids, mask) = tiny_llama(), padded_ids()
    steps = HEADROOM + 5  # the buffers fill once and are made again
    want = _decode(model, DynamicCache(), ids, mask, steps)
    cache = GrowingCache()
    got = _decode(model, cache, ids, mask, steps)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    layer = cache.layers[0]
    assert layer.keys.shape[-2] == ids.shape[1] + steps
    assert layer.keys.untyped_storage().data_ptr() == layer._buffers[0].untyped_storage().data_ptr()


def test_a_step_writes_in_place_and_earlier_views_keep_their_values():
    model, (ids, mask) = tiny_llama(), padded_ids()
    cache = GrowingCache()
    seen = {}

    def keep(c, step):
        if step == 0:
            seen["view"], seen["copy"] = c.layers[1].keys[:, :, :3], c.layers[1].keys[:, :, :3].clone()
            seen["buffer"] = c.layers[1]._buffers[0]
        if step == 5:
            assert c.layers[1]._buffers[0] is seen["buffer"]  # no new buffer within the headroom
        return 0

    _decode(model, cache, ids, mask, 6, keep)
    assert torch.equal(seen["view"], seen["copy"])


def test_tensors_replaced_from_outside_are_taken_as_they_are():
    """The engine's merge and drop_finished assign new keys/values (rows stacked, rows dropped, columns
    trimmed): the next step appends to those, as DynamicCache does."""
    model, (ids, mask) = tiny_llama(), padded_ids()

    def trim(c, step):  # drop the first column of every row (a padding column all rows leave)
        if step != 2:
            return 0
        for layer in c.layers:
            layer.keys, layer.values = layer.keys[:, :, 1:], layer.values[:, :, 1:]
        return 1

    # The same rows with one more leading padding column, trimmed after step 2, on either cache.
    ids, mask = torch.cat([ids[:, :1] * 0, ids], 1), torch.cat([mask[:, :1] * 0, mask], 1)
    want = _decode(model, DynamicCache(), ids, mask, 6, trim)
    cache = GrowingCache()
    got = _decode(model, cache, ids, mask, 6, trim)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert cache.layers[0].keys.shape[-2] == ids.shape[1] - 1 + 6


def test_starts_from_given_keys_and_values():
    model, (ids, mask) = tiny_llama(), padded_ids()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=True, cache=DynamicCache())
    data = [(layer.keys, layer.values) for layer in ref.cache.layers]
    cache = GrowingCache(data)
    assert all(torch.equal(a.keys, k) and torch.equal(a.values, v) for a, (k, v) in zip(cache.layers, data))
    assert cache.get_seq_length() == ids.shape[1]
