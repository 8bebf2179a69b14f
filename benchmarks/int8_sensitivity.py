"""How far int8 answers move under float rounding: eager noise, and compiled vs eager decode steps.

    python benchmarks/int8_sensitivity.py

On the demo prompts with the bundled assets' routing, for the fp32 and the int8 base: (1) the prefill's
next-token logits with the embeddings multiplied by (1 + 1e-6 * noise) against without, eagerly; (2) the
prefill and --steps greedy steps run by `CompiledDecoder` against `EagerDecoder` (the compiled side also
compiles, tens of seconds). Prints the largest logit difference and how many next tokens agree.
"""

from __future__ import annotations

import argparse

import torch


def _logits(decoder, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """(steps + 1, B, V): the prefill's logits and each greedy step's."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = [decoder.prefill(ids, mask, positions, steps + 1)]
    pos = positions[:, -1]
    for _ in range(steps):
        pos = pos + 1
        out.append(decoder.step(out[-1].argmax(-1), pos))
    return torch.stack(out)


def _agree(a: torch.Tensor, b: torch.Tensor) -> str:
    same = a.argmax(-1) == b.argmax(-1)
    return f"{(a - b).abs().max().item():.2g} | {int(same.sum())} / {same.numel()}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", default=None, help="default: the bundled assets")
    p.add_argument("--steps", type=int, default=12)
    ns = p.parse_args(argv)

    from dlp_lora.assets import DEFAULT_ASSETS
    from dlp_lora.chat import encode_prompts
    from dlp_lora.compiled import CompiledDecoder
    from dlp_lora.demo import DEMO_PROMPTS
    from dlp_lora.engine import EagerDecoder
    from dlp_lora.pipeline import DLPLoRA

    prompts = list(DEMO_PROMPTS)
    print("| base | comparison | max logit difference | next tokens that agree |")
    print("|---|---|---|---|")
    prefill: dict[str, torch.Tensor] = {}
    for quant in ("none", "int8"):
        dlp = DLPLoRA.from_assets(ns.assets or DEFAULT_ASSETS, quantize=quant)
        ids, mask = encode_prompts(dlp.tokenizer, prompts, None)
        noisy = lambda module, args, out: out * (1 + 1e-6 * torch.randn_like(out))  # noqa: E731
        with torch.no_grad(), dlp.fused.routed(dlp.route(prompts)):
            torch.manual_seed(0)
            clean = _logits(EagerDecoder(dlp.model), ids, mask, 0)[0]
            hook = dlp.model.get_input_embeddings().register_forward_hook(noisy)
            try:
                shaken = _logits(EagerDecoder(dlp.model), ids, mask, 0)[0]
            finally:
                hook.remove()
            eager = _logits(EagerDecoder(dlp.model), ids, mask, ns.steps)
            compiled = _logits(CompiledDecoder(dlp.model), ids, mask, ns.steps)
        prefill[quant] = clean
        name = "fp32" if quant == "none" else quant
        print(f"| {name} | eager, embeddings x (1 + 1e-6 noise) vs not (prefill) | {_agree(shaken, clean)} |")
        print(f"| {name} | compiled vs eager (prefill + {ns.steps} steps) | {_agree(compiled, eager)} |")
        dlp.close()
    print(f"| int8 vs fp32 | eager (prefill) | {_agree(prefill['int8'], prefill['none'])} |")


if __name__ == "__main__":
    main()
