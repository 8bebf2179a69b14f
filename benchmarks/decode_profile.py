"""Where a decode step's time goes: torch.profiler over greedy decode steps of the embedded base model.

    python benchmarks/decode_profile.py --quantize int8 --batch 1
    python benchmarks/decode_profile.py --quantize none --batch 8 --rows 15

Prefills a random prompt of --prompt-tokens, warms up, times --steps decode steps (wall clock), then
profiles --steps more and prints the ops that took the most self time (per step) and the share of the
step they account for. Timed: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quantize", choices=("none", "int8"), default="int8")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rows", type=int, default=10, help="ops to list")
    ns = p.parse_args(argv)

    from torch.profiler import ProfilerActivity, profile

    from dlp_lora.engine import EagerDecoder
    from dlp_lora.models import load_base_model

    model, _ = load_base_model(quantize=ns.quantize)
    ids = torch.randint(100, 40_000, (ns.batch, ns.prompt_tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    positions = mask.cumsum(-1) - 1
    decoder = EagerDecoder(model)  # the decoder `Engine.generate` runs: dynamic KV cache, the mask grows per step
    with torch.no_grad():
        state = {"logits": decoder.prefill(ids, mask, positions, 3 + 2 * ns.steps), "pos": positions[:, -1]}

        def steps(n: int) -> None:
            for _ in range(n):
                state["pos"] = state["pos"] + 1
                state["logits"] = decoder.step(state["logits"].argmax(-1), state["pos"])

        steps(3)
        t0 = time.perf_counter()
        steps(ns.steps)
        step_ms = (time.perf_counter() - t0) / ns.steps * 1000
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps(ns.steps)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    calls = sum(e.count for e in events if e.key.startswith("aten::"))
    print(
        f"{ns.quantize}, batch {ns.batch}, {torch.get_num_threads()} threads: {step_ms:.2f} ms per decode step "
        f"(wall), {calls / ns.steps:.0f} aten op calls per step (nested ones included)"
    )
    print("| op | calls / step | self ms / step | share of the step |")
    print("|---|---|---|---|")
    for e in events[: ns.rows]:
        ms = e.self_cpu_time_total / 1000 / ns.steps
        print(f"| {e.key} | {e.count / ns.steps:.0f} | {ms:.2f} | {ms / step_ms:.0%} |")


if __name__ == "__main__":
    main()
