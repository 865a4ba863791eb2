"""Train the embedded tiny chat model with MuonClip and write it, block-fp8, to kimi_jax/assets/tiny_chat.

    make train-tiny                       # the shipped recipe (~27 min on 2 cores)
    python scripts/train_tiny.py --steps 50 --out /tmp/tiny_chat     # a quick look

Corpus, tokenizer, training and the held-out evaluation all live in `kimi_jax.train`; the run is a
function of the flags alone (seeded). The summary (losses, max attention logit, eval figures) is
written next to the weights as training.json.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_jax.train.trainer import Recipe, train_tiny_chat  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "kimi_jax" / "assets" / "tiny_chat"


def main() -> None:
    recipe = Recipe()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory (default: %(default)s)")
    p.add_argument("--steps", type=int, default=recipe.train.steps)
    p.add_argument("--lr", type=float, default=recipe.train.learning_rate, help="peak learning rate")
    p.add_argument("--qk-clip-tau", type=float, default=recipe.train.qk_clip_tau)
    p.add_argument("--seed", type=int, default=recipe.train.seed, help="initialisation and batch order")
    p.add_argument("--conversations", type=int, default=recipe.conversations)
    p.add_argument("--copy-steps", type=int, default=recipe.copy_steps, help="steps on copying alone, first")
    p.add_argument("--copy-every", type=int, default=recipe.copy_every,
                   help="then every N-th batch is a copying one (0: none)")
    p.add_argument("--corpus-seed", type=int, default=recipe.corpus_seed)
    p.add_argument("--eval-cases", type=int, help="held-out cases to evaluate (default: all)")
    args = p.parse_args()

    train = dataclasses.replace(recipe.train, steps=args.steps, learning_rate=args.lr,
                                qk_clip_tau=args.qk_clip_tau, seed=args.seed)
    recipe = dataclasses.replace(recipe, conversations=args.conversations, corpus_seed=args.corpus_seed, train=train,
                                 copy_steps=args.copy_steps, copy_every=args.copy_every)
    summary = train_tiny_chat(args.out, recipe, log=lambda line: print(line, flush=True),
                              eval_cases=args.eval_cases)
    print(f"final loss {summary['final_loss']:.4f}, training {summary['train_seconds']:.0f}s, "
          f"total {summary['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
