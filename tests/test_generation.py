"""Generation: cached decode vs teacher-forced forward, transformers parity, batching, buckets, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kimi_jax
from kimi_jax.config import TINY_DEEPSEEK, TINY_KIMI
from kimi_jax.model.decoder import Transformer, init_cache
from kimi_jax.runtime.requests import Completion, batch_bucket, length_bucket, make_requests

pytestmark = pytest.mark.generation

# Lengths all fall in the 16-token prompt bucket, so each batch size compiles one prefill.
PROMPTS = [[5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [42, 7, 99]]


@pytest.fixture(scope="module")
def kimi(hub_checkpoint):
    path, _ = hub_checkpoint(TINY_KIMI)
    return kimi_jax.load(path, dtype="float32")


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    from kimi_jax.runtime.default_model import random_checkpoint

    return random_checkpoint(tmp_path_factory.mktemp("kimi_jax_cache"))


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


NEW = 10  # teacher-forced continuation length


@pytest.fixture(scope="module")
def teacher(kimi):
    """Greedy continuations of PROMPTS, right-padded into one batch, and its cache-free forward logits."""
    new = kimi.generate(PROMPTS, max_new_tokens=NEW, temperature=0)
    seqs = [p + n for p, n in zip(PROMPTS, new)]
    t = max(map(len, seqs))
    tokens = np.array([s + [0] * (t - len(s)) for s in seqs], np.int32)
    positions = np.array([[i if i < len(s) else -1 for i in range(t)] for s in seqs], np.int32)
    full = np.asarray(kimi._forward(kimi.params, tokens, positions))  # (B, T, V), no cache
    return new, tokens, positions, full


def test_cached_decode_equals_teacher_forced_forward(kimi, teacher):
    """Prefill + absorbed decode steps give, at every step, the logits of one full forward (fp32, 1e-5)."""
    new, tokens, _, full = teacher
    gen = kimi.generator
    requests = make_requests(kimi.config, PROMPTS, max_new_tokens=NEW + 1, temperature=0)
    last, cache, *_ = gen.prefill(requests)
    lengths = [len(p) for p in PROMPTS]
    for r, n in enumerate(lengths):
        assert _rel(np.asarray(last)[r], full[r, n - 1]) <= 1e-5
    for i in range(NEW):
        step_tokens = np.zeros(4, np.int32)  # the batch bucket of 3 prompts is 4; row 3 is padding
        step_pos = np.full(4, -1, np.int32)
        for r, n in enumerate(lengths):
            assert full[r, n + i - 1].argmax() == new[r][i]  # greedy took the forward pass's argmax
            step_tokens[r], step_pos[r] = new[r][i], n + i
        logits, cache = gen.step_logits(kimi.params, cache, step_tokens, step_pos)
        for r, n in enumerate(lengths):
            assert _rel(np.asarray(logits)[r], full[r, n + i]) <= 1e-5, f"row {r}, step {i}"


def test_absorbed_equals_expanded_attention(kimi, teacher):
    """Both MLA forms over a latent cache (rows padded) agree with each other and with the cache-free forward."""
    _, tokens, positions, full = teacher
    cfg, (b, t) = kimi.config, tokens.shape
    outs = {}
    for absorb in (False, True):
        module = Transformer(cfg, absorb=absorb, backend=kimi.backend, dtype=jnp.float32)
        run = jax.jit(lambda p, x, pos, c, m=module: m.apply({"params": p}, x, pos, c))
        outs[absorb] = run(kimi.params, tokens, positions, init_cache(cfg, b, t, jnp.float32))
    (lo_e, cache_e), (lo_a, cache_a) = outs[False], outs[True]
    valid = positions >= 0
    assert _rel(np.asarray(lo_a)[valid], np.asarray(lo_e)[valid]) <= 1e-5
    assert _rel(np.asarray(lo_e)[valid], full[valid]) <= 1e-5
    for group in cache_e:  # the same latents whichever form attends (up to the rounding of earlier layers)
        assert _rel(np.asarray(cache_a[group].latent), np.asarray(cache_e[group].latent)) <= 1e-5
        assert np.all(np.asarray(cache_e[group].latent)[:, ~valid] == 0)  # padding wrote nothing


@pytest.mark.parametrize("cfg", [TINY_KIMI, TINY_DEEPSEEK], ids=["kimi", "deepseek"])
def test_greedy_matches_transformers_generate(cfg, hub_checkpoint, kimi):
    import torch

    from kimi_jax.bench.oracle import hf_model

    path, params = hub_checkpoint(cfg)
    model = kimi if cfg is TINY_KIMI else kimi_jax.load(path, dtype="float32")
    ours = model.generate(PROMPTS, max_new_tokens=8, temperature=0)
    oracle = hf_model(params, cfg)
    for prompt, got in zip(PROMPTS, ours):
        want = oracle.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                               pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert got == want[0, len(prompt):].tolist()


def test_batched_equals_unbatched(kimi):
    """Different prompt lengths and per-request settings in one batch: each row gives what it gives alone."""
    settings = dict(temperature=[0.0, 0.9, 0.7], top_p=[1.0, 0.9, 1.0], top_k=[0, 0, 20], seed=[3, 4, 5],
                    max_new_tokens=[8, 5, 7])
    together = kimi.generate(PROMPTS, **settings)
    for i, prompt in enumerate(PROMPTS):
        alone = kimi.generate([prompt], **{k: v[i] for k, v in settings.items()})[0]
        assert together[i] == alone
    assert [len(t) for t in together] == [8, 5, 7]
    assert kimi.generate(PROMPTS[:1], temperature=0.9, seed=3, max_new_tokens=8) != \
        kimi.generate(PROMPTS[:1], temperature=0.9, seed=4, max_new_tokens=8)


def test_threads_sharing_a_generator_take_turns(kimi, monkeypatch):
    """Three threads generating on one generator: no two of its programs run at once (each call holds
    the generator until its results are ready), and each thread gets what it gets alone."""
    import threading
    import time

    gen = kimi.generator
    alone = [kimi.generate([p], max_new_tokens=6, temperature=0)[0] for p in PROMPTS]
    running, most = [0], [0]

    def counted(compiled):
        def run(*args):
            running[0] += 1
            most[0] = max(most[0], running[0])
            out = jax.block_until_ready(compiled(*args))
            time.sleep(0.01)  # widen the window a concurrent call would land in
            running[0] -= 1
            return out
        return run

    monkeypatch.setattr(gen, "_decode", counted(gen._decode))
    monkeypatch.setattr(gen, "_prefill", counted(gen._prefill))
    got = [None] * len(PROMPTS)

    def worker(i):
        got[i] = kimi.generate([PROMPTS[i]], max_new_tokens=6, temperature=0)[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == alone
    assert most[0] == 1


def test_prompt_lengths_share_a_compiled_program(kimi):
    gen = kimi.generator
    kimi.generate([[3] * 4], max_new_tokens=3, temperature=0)
    before = dict(gen.traces)
    for n in (5, 9, 13):
        kimi.generate([[3] * n], max_new_tokens=3 + n, temperature=0)
    assert dict(gen.traces) == before
    assert length_bucket(17) == 24 and length_bucket(25) == 32
    assert batch_bucket(3) == 4 and batch_bucket(1, multiple=4) == 4


def test_stop_ids_and_max_new_tokens(kimi, teacher):
    """Per-request stop ids in one batch: a row ends on its stop (kept last), the others run to max_new_tokens."""
    free = teacher[0]  # greedy, no stops, NEW tokens each
    stop = free[0][3]
    out = kimi.generate(PROMPTS, max_new_tokens=NEW, temperature=0, stop_token_ids=[[stop], [], []])
    assert out[0] == free[0][:free[0].index(stop) + 1]
    assert out[1:] == free[1:]
    done = kimi.generator.generate(make_requests(kimi.config, PROMPTS, NEW, 0.0, stop_token_ids=[stop]))
    assert done[0].finish_reason == "stop" and done[0].token_ids[-1] == stop


def test_clear_errors(kimi):
    limit = kimi.config.max_position_embeddings
    with pytest.raises(ValueError, match="over the model's context of 2048"):
        kimi.generate([[1] * (limit - 3)], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        kimi.generate([[1], []])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        kimi.generate([[1, kimi.config.vocab_size]])
    with pytest.raises(ValueError, match="temperature has 2 entries for 3 prompts"):
        kimi.generate(PROMPTS, temperature=[0.1, 0.2])
    with pytest.raises(ValueError, match="wrap a single prompt"):
        kimi.generate([1, 2, 3])
    with pytest.raises(ValueError, match="top_p"):
        kimi.generate([[1]], top_p=0)


class Canned:
    """Stands in for the compiled engine (the random weights never write a tool call or whole words)."""

    def __init__(self, cfg, tokens):
        self.cfg, self.tokens, self.requests = cfg, tokens, []

    def stream(self, requests):
        self.requests += requests
        for i in range(0, len(self.tokens), 3):  # three tokens per "compiled call"
            yield [self.tokens[i:i + 3]]

    def generate(self, requests):
        self.requests += requests
        return [Completion(list(self.tokens), "stop")]


def test_stream_and_chat(kimi, random_dir):
    """Streaming yields generate's tokens; text pieces never split a character; chat parses tool calls."""
    from kimi_jax.runtime.default_model import random_config

    ids = [p.token_id for p in kimi.stream(PROMPTS[0], max_new_tokens=6, temperature=0)]
    assert ids == kimi.generate([PROMPTS[0]], max_new_tokens=6, temperature=0)[0]

    tok = kimi_jax.load_tokenizer(random_dir)
    model = kimi_jax.Model(random_config(), {}, dtype="float32", tokenizer=tok)
    text = "Grüße, 世界!"  # multi-byte characters, split over byte-level tokens
    model.__dict__["generator"] = Canned(model.config, tok.encode(text) + [tok.im_end_id])
    pieces = list(model.stream("Hello", max_new_tokens=100))
    assert "".join(p.text for p in pieces) == text and pieces[-1] == (tok.im_end_id, "")
    assert all("\ufffd" not in p.text for p in pieces)

    reply = ('Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
             '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')
    canned = model.__dict__["generator"] = Canned(model.config, tok.encode_with_special(reply) + [tok.im_end_id])
    out = model.chat([{"role": "user", "content": "Weather in Paris?"}], tools=[{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object"}}}], temperature=0)
    assert out["content"] == "Let me check."
    assert out["tool_calls"] == [{"id": "functions.get_weather:0", "type": "function",
                                  "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    request, = canned.requests
    assert request.stop_ids == tok.stop_ids and request.sampling.temperature == 0
    assert request.prompt[-2:] == tuple(tok.encode_with_special("<|im_assistant|>assistant<|im_middle|>"))[-2:]


def test_sharded_decode_equals_unsharded(kimi, hub_checkpoint):
    """On the fake 8-device mesh (batch over data, experts over expert, heads over tensor)."""
    path, _ = hub_checkpoint(TINY_KIMI)
    sharded = kimi_jax.load(path, dtype="float32", mesh="data=2,expert=2,tensor=2")
    settings = dict(max_new_tokens=6, temperature=[0.0, 0.8, 0.0], seed=[0, 1, 2])
    assert sharded.generate(PROMPTS, **settings) == kimi.generate(PROMPTS, **settings)
    cache = sharded.generator.prefill(make_requests(sharded.config, PROMPTS, 6))[1]
    spec = cache["moe_layers"].latent.sharding.spec
    assert tuple(spec)[:2] == (None, "data")


def test_random_model_is_a_hub_checkpoint(random_dir):
    from kimi_jax.model.quant import QArray
    from kimi_jax.runtime.default_model import BPE_RANKS, random_checkpoint, random_config

    path = random_dir
    assert random_checkpoint(path.parent) == path  # written once, then found
    names = sorted(p.name for p in path.iterdir())
    assert names == ["config.json", "model-1-of-2.safetensors", "model-2-of-2.safetensors",
                     "model.safetensors.index.json", "tiktoken.model"]
    model = kimi_jax.load(path)
    assert model.tokenizer.vocab_size == model.config.vocab_size == BPE_RANKS + 256
    assert model.config == kimi_jax.Config.from_json(path) and model.config.quantized
    assert isinstance(model.params["moe_layers"]["ffn"]["experts_gate"], QArray)
    assert random_config().num_hidden_layers == TINY_KIMI.num_hidden_layers
