"""`python -m kimi_jax.generate`: JSON and streaming output, the embedded default, clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kimi_jax import generate as cli
from kimi_jax.config import TINY_KIMI
from kimi_jax.runtime.compile_cache import cache_root
from kimi_jax.text.tokenizer import load_tokenizer

pytestmark = pytest.mark.generation

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A fresh cache directory; compiled programs go to the usual cache (fast reruns)."""
    env = dict(os.environ)
    env.setdefault("KIMI_JAX_COMPILE_CACHE", str(cache_root() / "xla"))
    env["KIMI_JAX_CACHE"] = str(tmp_path_factory.mktemp("kimi_jax_home"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run(env, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", "kimi_jax.generate", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow
def test_demo_conversation_json_and_stream(env):
    """No prompt: the embedded tiny chat model answers, calls get_weather, and answers from the result."""
    out = json.loads(run(env, "--json").stdout)
    assert out["temperature"] == 0.0 and out["checkpoint"] == "embedded tiny chat model"
    intro, weather = out["conversations"]
    assert [m["role"] for m in intro] == ["user", "assistant"] and "Kimi" in intro[1]["content"]
    assert [m["role"] for m in weather] == ["user", "assistant", "tool", "assistant"]
    call, = weather[1]["tool_calls"]
    assert call["id"] == "functions.get_weather:0" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert json.loads(weather[2]["content"]) == cli.demo_get_weather("Paris")
    assert "18" in weather[3]["content"] and "partly cloudy" in weather[3]["content"]
    assert len(out["token_ids"]) == 3 and out["decode_tokens_per_s"] > 0

    streamed = run(env)  # greedy: the same conversation, streamed as text
    assert streamed.stdout.splitlines() == [
        f"user: {cli.DEMO_QUESTION}", f"assistant: {intro[1]['content']}",
        f"user: {cli.DEMO_WEATHER_QUESTION}", 'assistant: [tool call] get_weather({"city": "Paris"})',
        f"tool: {weather[2]['content']}", f"assistant: {weather[3]['content']}"]
    summary = streamed.stderr.strip().splitlines()[-1]
    tokens = sum(map(len, out["token_ids"]))
    assert f"{tokens} tokens" in summary and "time to first token" in summary and "tokens/s" in summary


@pytest.mark.slow
def test_chat_json(env):
    """--chat goes through the chat template, samples at the model card's 0.6 unless told, reports the parsed reply."""
    from kimi_jax.runtime.default_model import TINY_CHAT

    out = json.loads(run(env, "--chat", "What is the capital of France?", "--max-new-tokens", "4", "--json").stdout)
    assert out["temperature"] == 0.6 and len(out["token_ids"]) <= 4
    im_middle = load_tokenizer(TINY_CHAT).special_ids["<|im_middle|>"]
    assert out["prompt_ids"][-1] == im_middle  # the assistant turn is open
    out = json.loads(run(env, "--chat", "What is the capital of France?", "--temperature", "0", "--json").stdout)
    assert out["finish_reason"] == "stop" and out["tool_calls"] == []
    assert out["content"] == out["text"] and "Paris" in out["content"]
    streamed = run(env, "--chat", "What is the capital of France?", "--temperature", "0")
    assert streamed.stdout == out["content"] + "\n"
    # A reply that is a tool call streams as the parsed call, not as the model's marker tokens.
    called = run(env, "--chat", "What's the weather in Oslo?", "--temperature", "0")
    assert called.stdout == '[tool call] get_weather({"city": "Oslo"})\n'


def test_checkpoint_json_matches_transformers(env, hub_checkpoint):
    import torch

    from kimi_jax.bench.oracle import hf_model

    path, params = hub_checkpoint(TINY_KIMI)
    out = json.loads(run(env, "--checkpoint", str(path), "--prompt-ids", "5 6 7 8", "--max-new-tokens", "6",
                         "--temperature", "0", "--dtype", "float32", "--json").stdout)
    want = hf_model(params, TINY_KIMI).generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=6, do_sample=False,
                                                eos_token_id=None, pad_token_id=0,
                                                attention_mask=torch.ones(1, 4, dtype=torch.long))
    assert out["token_ids"] == want[0, 4:].tolist()
    assert out["text"] == ""  # this checkpoint has no tokenizer


@pytest.mark.parametrize("args, message", [
    (["--prompt-ids", "1 2 3", "--max-new-tokens", "5000"], "over the model's context of 4096"),
    (["--prompt-ids", "1 two"], "--prompt-ids must be integers"),
])
def test_errors_are_one_clear_line(env, args, message):
    proc = run(env, *args, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last


def test_help_documents_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--prompt", "--chat", "--prompt-ids", "--max-new-tokens", "--temperature",
                 "--top-p", "--top-k", "--seed", "--mesh", "--dtype", "--json"):
        assert flag in text


def test_decode_rate_leaves_compiling_out():
    """A reply that compiles a new decode bucket mid-stream: the rate counts decoding only, and the
    summary says how long compiling took."""
    import jax
    import jax.numpy as jnp

    start = cli.CompileClock.now()
    jax.jit(lambda x: jnp.sin(x) * 3.5 + 1.25)(jnp.arange(7.0)).block_until_ready()  # a fresh program
    compiled = cli.CompileClock.now() - start
    assert compiled > 0
    turn = cli.Turn(tokens=list(range(11)), text="", seconds=2.0 + compiled, first_token_s=1.0, compile_s=compiled)
    assert cli._rate([turn]) == pytest.approx(10 / 1.0)
    assert "compiling new decode buckets took" in cli._summary([turn])
    assert "compiling" not in cli._summary([cli.Turn(list(range(3)), "", 2.0, 1.0)])


def test_a_cpu_host_with_libtpu_starts_without_its_errors(env):
    """libtpu (the test extra's deviceless TPU compiler) is installed, but this host has no TPU chip: with
    no JAX_PLATFORMS, generate starts on the CPU alone, without libtpu's screen of start-up errors."""
    import importlib.util

    from kimi_jax.runtime.distributed import cpu_only_host

    assert importlib.util.find_spec("libtpu") is not None, "the test extra installs jax[tpu]"
    assert cpu_only_host(), "this test describes a CPU-only host (no TPU chip, no JAX GPU plugin)"
    bare = {k: v for k, v in env.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    proc = run(bare, "--prompt-ids", "1 2", "--max-new-tokens", "2", "--json")
    assert len(json.loads(proc.stdout)["token_ids"]) == 2
    assert "TPU" not in proc.stderr and "libtpu" not in proc.stderr, proc.stderr[-2000:]
    # A platform the user chose is kept: JAX then tries libtpu as it always does.
    chosen = run({**bare, "JAX_PLATFORMS": "tpu,cpu"}, "--prompt-ids", "1 2", "--max-new-tokens", "2", check=False)
    assert "TPU" in chosen.stderr


def test_cpu_only_host_sees_tpu_chips_and_gpu_plugins(monkeypatch):
    """The check behind that: a TPU chip on the PCI bus or a TPU device file, or a JAX GPU plugin
    installed, and JAX keeps every platform it knows."""
    import importlib.metadata

    from jax._src import hardware_utils

    from kimi_jax.runtime.distributed import cpu_only_host

    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (4, None))
    assert not cpu_only_host()
    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (0, None))
    assert cpu_only_host()
    import glob

    real_glob = glob.glob
    monkeypatch.setattr(glob, "glob", lambda p: ["/dev/accel0"] if p == "/dev/accel*" else real_glob(p))
    assert not cpu_only_host()  # a TPU device file in a container that hides the PCI bus
    monkeypatch.setattr(glob, "glob", real_glob)
    plugin = importlib.metadata.EntryPoint("xla_cuda12", "jax_cuda12_plugin", "jax_plugins")
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [plugin] if group == "jax_plugins" else [])
    assert not cpu_only_host()
