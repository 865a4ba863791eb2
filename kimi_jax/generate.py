"""Command line: `python -m kimi_jax.generate` continues a prompt and streams the text.

With no arguments it loads the embedded default (a tiny Kimi-K2-architecture model with random
weights, so the text is noise; see kimi_jax/default_model.py), continues a default prompt
greedily (temperature 0, so the run is reproducible) and streams the text to stdout, with a
one-line summary on stderr. `--json` prints one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from kimi_jax import distributed

EPILOG = """\
examples:
  python -m kimi_jax.generate                                  # embedded default, greedy
  python -m kimi_jax.generate --checkpoint /ckpt/Kimi-K2-Instruct --chat "Hello!"
  python -m kimi_jax.generate --prompt-ids "1 2 3" --max-new-tokens 8 --json
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kimi_jax.generate", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="PATH",
                   help="Hugging Face checkpoint directory (config.json, safetensors shards, tiktoken.model); "
                        "default: the embedded tiny model with random weights")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT", help="raw text to continue (no chat template)")
    src.add_argument("--chat", metavar="TEXT", help="one user turn, formatted with the chat template; "
                                                    "generation stops at the end of the assistant turn")
    src.add_argument("--prompt-ids", metavar="IDS", help='token ids to continue, e.g. "1 2 3"')
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="at most N new tokens (default 64)")
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="0 = greedy; default 0.6 (the model card's), or 0 when no prompt is given")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K most likely tokens (default 0: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--mesh", metavar="SPEC",
                   help="device mesh to shard over, e.g. 'data=1,expert=4,tensor=2' (sizes multiply to the devices)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype: bfloat16 (default) or float32")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (token_ids, text, ...) instead of streaming text")
    distributed.add_arguments(p)
    return p.parse_args(argv)


def _prompt_ids(args, model) -> tuple[list[int], bool]:
    """The prompt as token ids, and whether it is a chat turn."""
    from kimi_jax.default_model import DEFAULT_PROMPT

    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"--prompt-ids must be integers separated by spaces, got {args.prompt_ids!r}") from None
        return ids, False
    if model.tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer (tiktoken.model); pass --prompt-ids instead")
    if args.chat is not None:
        return model.tokenizer.apply_chat_template([{"role": "user", "content": args.chat}]), True
    return model.tokenizer.encode(args.prompt if args.prompt is not None else DEFAULT_PROMPT), False


def run(args: argparse.Namespace) -> int:
    import kimi_jax
    from kimi_jax.default_model import load_default

    info = distributed.initialize(args)  # before any device is touched; a no-op for one process
    if info.num_processes > 1 and not args.mesh:
        raise ValueError(f"a {info.num_processes}-process run shards the model over every process's devices: "
                         "pass --mesh, e.g. --mesh expert=8 for 8 devices in all")
    if info.num_processes > 1:  # native logs (gloo) to stderr; every process computes, only process 0 prints
        distributed.python_only_stdout()
        if not info.is_main:
            sys.stdout = open(os.devnull, "w")
    if args.checkpoint:
        model = kimi_jax.load(args.checkpoint, dtype=args.dtype, mesh=args.mesh)
    else:
        model = load_default(dtype=args.dtype, mesh=args.mesh)
    ids, is_chat = _prompt_ids(args, model)
    no_prompt = args.prompt is None and args.chat is None and args.prompt_ids is None
    temperature = args.temperature if args.temperature is not None else (0.0 if no_prompt else 0.6)
    if not args.checkpoint and not args.json:
        print("[kimi_jax] embedded default model: random weights, so the text is noise", file=sys.stderr)

    start = time.perf_counter()
    tokens, pieces, first_at = [], [], None
    for piece in model.stream(ids, max_new_tokens=args.max_new_tokens, temperature=temperature,
                              top_p=args.top_p, top_k=args.top_k, seed=args.seed):
        first_at = first_at or time.perf_counter()
        tokens.append(piece.token_id)
        pieces.append(piece.text)
        if not args.json:
            sys.stdout.write(piece.text)
            sys.stdout.flush()
    end = time.perf_counter()
    ttft = first_at - start
    decode_rate = (len(tokens) - 1) / (end - first_at) if len(tokens) > 1 and end > first_at else float("nan")
    text = "".join(pieces)
    if args.json:
        out = {"token_ids": tokens, "text": text, "prompt_ids": ids,
               "finish_reason": "stop" if tokens and tokens[-1] in model.stop_ids else "length",
               "temperature": temperature, "time_to_first_token_s": round(ttft, 4),
               "decode_tokens_per_s": round(decode_rate, 2), "checkpoint": args.checkpoint or "embedded default"}
        if is_chat:
            from kimi_jax.tool_calls import parse_tool_calls

            out["content"], out["tool_calls"] = parse_tool_calls(text)
        print(json.dumps(out, ensure_ascii=False))
    else:
        print()
        print(f"[kimi_jax] {len(tokens)} tokens in {end - start:.2f} s: time to first token {ttft:.3f} s, "
              f"decode {decode_rate:.1f} tokens/s", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (OSError, ValueError, NotImplementedError, KeyError) as e:  # ConfigError/CheckpointError are ValueErrors
        message = str(e) if not isinstance(e, KeyError) else f"missing {e}"
        print(f"error: {message}", file=sys.stderr)
        return 1
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
