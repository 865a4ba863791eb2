"""How much a request's greedy tokens depend on the prefill batch it shares, on a mesh in bfloat16.

    python scripts/bench_bucket_drift.py [--mesh expert=4,tensor=2] [--prompts 16] [--tokens 32]

Each chat prompt is generated greedily alone (batch bucket 1), then with all the others at once
(one prefill and decode batch), on the embedded model placed on an 8-CPU-device mesh, in bfloat16
and float32. Reported: requests whose tokens differ, and for those the first position that does.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_jax.runtime.default_model import load_default  # noqa: E402

QUESTIONS = ["Who are you?", "What is the capital of France?", "What is 12 + 7?", "Hello!", "Please repeat: red fox",
             "What is the largest ocean?", "Tell me about yourself.", "What is the capital of Japan?",
             "Say hello to Ana.", "What is 30 - 4?", "Introduce yourself, please.", "What's the capital of Peru?",
             "Repeat after me: blue moon", "What is 9 * 3?", "Good morning!", "Which city is Kenya's capital?"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mesh", default="expert=4,tensor=2")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()
    for dtype in ("bfloat16", "float32"):
        model = load_default(dtype=dtype, mesh=args.mesh)
        tok = model.tokenizer
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
                   for q in QUESTIONS[:args.prompts]]
        alone = [model.generate([q], max_new_tokens=args.tokens, temperature=0)[0] for q in prompts]
        together = model.generate(prompts, max_new_tokens=args.tokens, temperature=0)
        first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                 for x, y in zip(alone, together) if x != y]
        print(f"{dtype}: {len(first)} of {len(prompts)} requests differ between batch 1 and batch {len(prompts)}"
              + (f"; first differing token at positions {sorted(first)}" if first else ""), flush=True)


if __name__ == "__main__":
    main()
