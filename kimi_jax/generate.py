"""Command line: `python -m kimi_jax.generate` continues a prompt, or holds a chat turn, and streams the text.

With no prompt it runs a short demo conversation, greedily (temperature 0, so the run is
reproducible): a question, then a weather question with the model card's `get_weather` tool
declared; the model's tool call is answered by a local stand-in for the tool, and the model
answers from its result. Without `--checkpoint` the model is the embedded tiny chat model
(kimi_jax/default_model.py). Text streams to stdout, a one-line summary goes to stderr;
`--json` prints one JSON object instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from kimi_jax.runtime import distributed, flags
from kimi_jax.runtime.default_model import CARD_WEATHER_TOOL, load_checkpoint_or_default
from kimi_jax.text.tool_calls import parse_tool_calls

EPILOG = """\
examples:
  python -m kimi_jax.generate                                  # embedded tiny model: the demo conversation
  python -m kimi_jax.generate --chat "What is 7 * 8?"
  python -m kimi_jax.generate --checkpoint /ckpt/Kimi-K2-Instruct --chat "Hello!"
  python -m kimi_jax.generate --prompt-ids "1 2 3" --max-new-tokens 8 --json
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kimi_jax.generate", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="PATH", type=flags.directory("checkpoint directory"),
                   help="Hugging Face checkpoint directory (config.json, safetensors shards, tiktoken.model); "
                        "default: the embedded tiny chat model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT", help="raw text to continue (no chat template)")
    src.add_argument("--chat", metavar="TEXT", help="one user turn, formatted with the chat template; "
                                                    "generation stops at the end of the assistant turn")
    src.add_argument("--prompt-ids", metavar="IDS", help='token ids to continue, e.g. "1 2 3"')
    p.add_argument("--max-new-tokens", type=flags.integer(1), default=96, metavar="N",
                   help="at most N new tokens (per assistant turn; default 96)")
    p.add_argument("--temperature", type=flags.real(0), default=None, metavar="T",
                   help="0 = greedy; default 0.6 (the model card's), or 0 for the demo (no prompt given)")
    p.add_argument("--top-p", type=flags.real(0, 1, open_lo=True), default=1.0, metavar="P",
                   help="nucleus sampling mass (default 1: off)")
    p.add_argument("--top-k", type=flags.integer(0), default=0, metavar="K",
                   help="keep the K most likely tokens (default 0: off)")
    p.add_argument("--seed", type=flags.SEED, default=0, help="sampling seed (default 0)")
    p.add_argument("--mesh", metavar="SPEC",
                   help="device mesh to shard over, e.g. 'data=1,expert=4,tensor=2' (sizes multiply to the devices)")
    p.add_argument("--dtype", help="compute dtype: bfloat16 (the default with --checkpoint) or float32 (the "
                                   "default for the embedded model, which is small enough that it costs nothing)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (token_ids, text, ...) instead of streaming text")
    distributed.add_arguments(p)
    return p.parse_args(argv)


def _prompt_ids(args, model) -> tuple[list[int], bool]:
    """The prompt as token ids, and whether it is a chat turn."""
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
    return model.tokenizer.encode(args.prompt), False


DEMO_QUESTION = "Who are you?"
DEMO_WEATHER_QUESTION = "What's the weather like in Paris today?"
DEMO_TOOL_ROUNDS = 3  # a model that keeps calling tools is cut off after this many rounds


def demo_get_weather(city: str) -> dict:
    """The demo's stand-in for a weather service: a fixed report for any city."""
    return {"city": city, "temperature_c": 18, "condition": "partly cloudy", "humidity": 60}


def _demo_tool(call: dict) -> dict:
    """Run one of the model's tool calls with the demo's tools; a call it cannot run gets an error result."""
    if call["function"]["name"] != "get_weather":
        return {"error": f"unknown tool {call['function']['name']!r}"}
    try:
        return demo_get_weather(**json.loads(call["function"]["arguments"]))
    except (ValueError, TypeError) as e:
        return {"error": f"bad arguments for get_weather: {e}"}


class CompileClock:
    """Seconds JAX has spent tracing, lowering and compiling in this process (jax.monitoring events).

    A reply that crosses into a new cache bucket compiles a new decode program mid-stream; the
    decode rate is reported without that time, and the time apart, so neither hides the other.
    """

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")
    seconds = 0.0
    _listening = False

    @classmethod
    def now(cls) -> float:
        if not cls._listening:
            import jax.monitoring

            jax.monitoring.register_event_duration_secs_listener(cls._record)
            cls._listening = True
        return cls.seconds

    @classmethod
    def _record(cls, event: str, duration: float, **_) -> None:
        if event in cls.EVENTS:
            cls.seconds += duration


@dataclasses.dataclass
class Turn:
    """One generated reply: its tokens, text (tool-call markers included) and timings."""

    tokens: list[int]
    text: str
    seconds: float
    first_token_s: float
    compile_s: float = 0.0  # compiling after the first token (a new decode bucket)

    @property
    def decode_tokens(self) -> int:
        return max(len(self.tokens) - 1, 0)


def _generate(model, ids: list[int], args, temperature: float, echo: bool, chat: bool) -> Turn:
    """Stream one reply; with `echo`, write its text to stdout as it comes (a chat reply up to its
    tool-call section, which `_calls_line` shows parsed)."""
    section = getattr(model.tokenizer, "special_ids", {}).get("<|tool_calls_section_begin|>") if chat else None
    start, first_at, compiled_at_first = time.perf_counter(), None, 0.0
    tokens, pieces = [], []
    for piece in model.stream(ids, max_new_tokens=args.max_new_tokens, temperature=temperature,
                              top_p=args.top_p, top_k=args.top_k, seed=args.seed):
        if first_at is None:
            first_at, compiled_at_first = time.perf_counter(), CompileClock.now()
        echo = echo and piece.token_id != section
        tokens.append(piece.token_id)
        pieces.append(piece.text)
        if echo:
            sys.stdout.write(piece.text)
            sys.stdout.flush()
    end = time.perf_counter()
    compile_s = CompileClock.now() - compiled_at_first if first_at is not None else 0.0
    return Turn(tokens, "".join(pieces), end - start, (first_at or end) - start, compile_s)


def _calls_line(content: str | None, calls: list[dict]) -> str:
    """What follows a streamed chat reply on its line: its tool calls, parsed."""
    shown = " ".join(f"[tool call] {c['function']['name']}({c['function']['arguments']})" for c in calls)
    return (" " if content and shown else "") + shown


def _rate(turns: list[Turn]) -> float:
    """Decode tokens per second after each turn's first token, compiling excluded."""
    decode_s = sum(t.seconds - t.first_token_s - t.compile_s for t in turns)
    return sum(t.decode_tokens for t in turns) / decode_s if decode_s > 0 else float("nan")


def _summary(turns: list[Turn]) -> str:
    compiling = sum(t.compile_s for t in turns)
    apart = f" (compiling new decode buckets took {compiling:.2f} s more)" if compiling >= 0.005 else ""
    return (f"[kimi_jax] {sum(len(t.tokens) for t in turns)} tokens in {sum(t.seconds for t in turns):.2f} s: "
            f"time to first token {turns[0].first_token_s:.3f} s, decode {_rate(turns):.1f} tokens/s{apart}")


def run_demo(model, args, temperature: float) -> int:
    """Two conversations: a question; a weather question whose tool calls `demo_get_weather` answers."""
    if model.tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer (tiktoken.model) for the demo conversation; "
                         "pass --prompt-ids instead")
    tools = [CARD_WEATHER_TOOL]
    conversations = [([{"role": "user", "content": DEMO_QUESTION}], None),
                     ([{"role": "user", "content": DEMO_WEATHER_QUESTION}], tools)]
    turns: list[Turn] = []
    for messages, declared in conversations:
        if not args.json:
            print(f"user: {messages[-1]['content']}")
        for _ in range(DEMO_TOOL_ROUNDS + 1):
            if not args.json:
                print("assistant: ", end="", flush=True)
            turn = _generate(model, model.tokenizer.apply_chat_template(messages, declared), args, temperature,
                             echo=not args.json, chat=True)
            turns.append(turn)
            content, calls = parse_tool_calls(turn.text)
            messages.append({"role": "assistant", "content": content or "", **({"tool_calls": calls} if calls else {})})
            if not args.json:
                print(_calls_line(content, calls))
            if not calls or turn.tokens[-1] not in model.stop_ids:
                break
            for call in calls:
                result = json.dumps(_demo_tool(call), ensure_ascii=False)
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
                if not args.json:
                    print(f"tool: {result}")
    if args.json:
        print(json.dumps({"conversations": [m for m, _ in conversations], "temperature": temperature,
                          "token_ids": [t.tokens for t in turns], "tools": tools,
                          "time_to_first_token_s": round(turns[0].first_token_s, 4),
                          "decode_tokens_per_s": round(_rate(turns), 2),
                          "decode_compile_s": round(sum(t.compile_s for t in turns), 3),
                          "checkpoint": args.checkpoint or "embedded tiny chat model"}, ensure_ascii=False))
    else:
        sys.stdout.flush()
        print(_summary(turns), file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    info = distributed.initialize(args)  # before any device is touched; a no-op for one process
    if info.num_processes > 1 and not args.mesh:
        raise ValueError(f"a {info.num_processes}-process run shards the model over every process's devices: "
                         "pass --mesh, e.g. --mesh expert=8 for 8 devices in all")
    if info.num_processes > 1:  # native logs (gloo) to stderr; every process computes, only process 0 prints
        distributed.python_only_stdout()
        if not info.is_main:
            sys.stdout = open(os.devnull, "w")
    model = load_checkpoint_or_default(args.checkpoint, args.dtype, mesh=args.mesh)
    no_prompt = args.prompt is None and args.chat is None and args.prompt_ids is None
    temperature = args.temperature if args.temperature is not None else (0.0 if no_prompt else 0.6)
    if no_prompt:
        return run_demo(model, args, temperature)

    ids, is_chat = _prompt_ids(args, model)
    turn = _generate(model, ids, args, temperature, echo=not args.json, chat=is_chat)
    if args.json:
        out = {"token_ids": turn.tokens, "text": turn.text, "prompt_ids": ids,
               "finish_reason": "stop" if turn.tokens and turn.tokens[-1] in model.stop_ids else "length",
               "temperature": temperature, "time_to_first_token_s": round(turn.first_token_s, 4),
               "decode_tokens_per_s": round(_rate([turn]), 2), "decode_compile_s": round(turn.compile_s, 3),
               "checkpoint": args.checkpoint or "embedded tiny chat model"}
        if is_chat:
            out["content"], out["tool_calls"] = parse_tool_calls(turn.text)
        print(json.dumps(out, ensure_ascii=False))
    else:
        if is_chat:
            print(_calls_line(*parse_tool_calls(turn.text)))
        else:
            print()
        sys.stdout.flush()
        print(_summary([turn]), file=sys.stderr)
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
