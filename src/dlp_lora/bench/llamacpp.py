"""llama.cpp as a yardstick: time the embedded GGUF through llama-cpp-python, the way `bench` times ours.

Optional (`pip install 'dlp-lora[llamacpp]'`, a ~15 minute compile on a 2-core CPU); nothing else imports
this module. Timings follow `benchmark._measure`: prefill is the time to the first token, decode the time
of the remaining tokens scaled to `new_tokens` steps, greedy (top_k=1), batch 1, the same prompt ids.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["LlamaCppTimer"]

_INSTALL = "pip install 'dlp-lora[llamacpp]'  (builds llama-cpp-python from source, ~15 minutes)"


class LlamaCppTimer:
    """One llama.cpp context on the embedded GGUF, sized for `prompt_tokens + new_tokens`."""

    def __init__(
        self, prompt_tokens: int, new_tokens: int, threads: int, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise ImportError(f"--llamacpp needs llama-cpp-python; install it with: {_INSTALL}") from None
        from dlp_lora.models import embedded_gguf_path

        self.gguf = embedded_gguf_path()
        self.version = llama_cpp.__version__
        self.new_tokens, self.clock = new_tokens, clock
        self.llm = llama_cpp.Llama(
            model_path=str(self.gguf),
            n_ctx=prompt_tokens + new_tokens + 8,
            n_batch=max(prompt_tokens, 8),
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )

    def measure(self, ids: torch.Tensor) -> tuple[float, float]:
        """ids: (1, T) prompt -> (prefill seconds, decode seconds for new_tokens)."""
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"llama.cpp is timed at batch 1; got prompt ids of shape {tuple(ids.shape)}")
        t0 = self.clock()
        stream = self.llm.generate(ids[0].tolist(), top_k=1, temp=0.0, reset=True)
        next(stream)
        t1 = self.clock()
        for _ in range(self.new_tokens - 1):
            next(stream)
        t2 = self.clock()
        return t1 - t0, (t2 - t1) * self.new_tokens / max(self.new_tokens - 1, 1)
