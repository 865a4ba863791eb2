"""Constrained decoding: grammars (text/grammar.py), the device mask (sampling.mask_logits), the
scheduler's matchers (runtime/constrained.py), and structured outputs / forced tool calls through
the server on the embedded model."""

from __future__ import annotations

import dataclasses
import json
import threading

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from kimi_jax.runtime.default_model import load_default
from kimi_jax.runtime.lockstep import request_from_json, request_to_json
from kimi_jax.runtime.requests import Constraint, make_requests
from kimi_jax.runtime.sampling import mask_logits
from kimi_jax.runtime.scheduler import Scheduler
from kimi_jax.text.grammar import GrammarError, Grammars, json_grammar, tool_call_grammar
from kimi_jax.text.tool_calls import SECTION_BEGIN, parse_tool_calls

# Nested, bounded: objects, arrays, enums, integers, a bounded string, additionalProperties false.
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["id", "kind", "tags", "owner"],
          "properties": {
              "id": {"type": "integer", "minimum": 0, "maximum": 999},
              "kind": {"enum": ["user", "admin", "guest"]},
              "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
              "owner": {"type": "object", "additionalProperties": False, "required": ["name", "age"],
                        "properties": {"name": {"type": "string", "maxLength": 8},
                                       "age": {"type": "integer", "minimum": 0, "maximum": 120}}}}}
CITY = {"type": "object", "additionalProperties": False, "required": ["city"],
        "properties": {"city": {"enum": ["Beijing", "Paris", "Rome"]}}}
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                      "b": {"type": "integer", "minimum": 0, "maximum": 99}}}
TOOLS = [("get_weather", CITY), ("add", ADD)]

pytestmark = pytest.mark.generation


@pytest.fixture(scope="module")
def model():
    return load_default()


@pytest.fixture(scope="module")
def grammars(model):
    return Grammars(model.tokenizer, model.config.padded_vocab_size)


def allowed_ids(row: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))


def walk(grammars, grammar: str, rng, limit: int = 400) -> list[int]:
    """Tokens drawn uniformly from each mask until an end-of-turn token: every path the mask allows."""
    matcher, row, out = grammars.matcher(grammar), np.zeros(grammars.words, np.int32), []
    stops = grammars.tokenizer.stop_ids
    for _ in range(limit):
        matcher.fill(row)
        token = int(rng.choice(allowed_ids(row)))
        out.append(token)
        if token in stops:
            return out
        matcher.advance(token)
    raise AssertionError(f"no end of turn after {limit} tokens: {grammars.tokenizer.decode(out)!r}")


def test_mask_logits_keeps_exactly_the_bits_set():
    rng = np.random.default_rng(0)
    v = 100  # not a multiple of 32: the last word's high bits are padding
    allowed = rng.integers(-2**31, 2**31, size=(3, 4), dtype=np.int64).astype(np.int32)
    logits = rng.normal(size=(3, v)).astype(np.float32)
    out = np.asarray(mask_logits(jnp.asarray(logits), jnp.asarray(allowed)))
    bits = np.unpackbits(allowed.view(np.uint8), axis=1, bitorder="little")[:, :v].astype(bool)
    np.testing.assert_array_equal(np.isfinite(out), bits)
    np.testing.assert_array_equal(out[bits], logits[bits])


def test_every_path_of_a_json_schema_grammar_validates(grammars, model):
    rng = np.random.default_rng(1)
    for _ in range(20):
        tokens = walk(grammars, json_grammar(SCHEMA), rng)
        jsonschema.validate(json.loads(model.tokenizer.decode(tokens[:-1])), SCHEMA)
    tok = model.tokenizer  # json_object: any object, and only an object
    matcher, row = grammars.matcher(json_grammar()), np.zeros(grammars.words, np.int32)
    matcher.fill(row)
    assert {tok.decode([t])[:1] for t in allowed_ids(row)} == {"{"}
    for token in tok.encode('{"free": [1, {"x": null}], "y": "z"}'):
        matcher.advance(token)
    assert matcher.finished


@pytest.mark.parametrize("parallel", [True, False])
def test_every_path_of_a_tool_call_grammar_is_a_valid_call(grammars, model, parallel):
    rng = np.random.default_rng(2)
    schemas = dict(TOOLS)
    counts = set()
    for _ in range(10):
        tokens = walk(grammars, tool_call_grammar(model.tokenizer, TOOLS, parallel), rng)
        content, calls = parse_tool_calls(model.tokenizer.decode(tokens[:-1]))
        assert content is None and calls
        counts.add(len(calls))
        for call in calls:
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
    assert counts == {1} if not parallel else max(counts) > 1


def test_named_and_opened_tool_grammars(grammars, model):
    rng = np.random.default_rng(3)
    tok = model.tokenizer
    named = tool_call_grammar(tok, [TOOLS[1]], parallel=False)
    for _ in range(5):
        _, calls = parse_tool_calls(tok.decode(walk(grammars, named, rng)[:-1]))
        assert [c["function"]["name"] for c in calls] == ["add"]
    opened = tool_call_grammar(tok, TOOLS, opened=True)  # what follows a section marker the model wrote
    for _ in range(5):
        _, calls = parse_tool_calls(SECTION_BEGIN + tok.decode(walk(grammars, opened, rng)[:-1]))
        assert calls


def test_a_thinking_model_reasons_before_the_grammar(grammars, model):
    tok = model.tokenizer
    matcher = grammars.matcher(json_grammar(CITY, tok, reasoning=True))
    for token in tok.encode('Rome, I think. </think>{"city": "Rome"}'):
        matcher.advance(token)
    assert matcher.finished
    row = np.zeros(grammars.words, np.int32)
    matcher.fill(row)
    assert set(allowed_ids(row)) == set(tok.stop_ids)  # only the end of the turn is left


def test_grammar_errors_name_the_problem(grammars, model):
    with pytest.raises(GrammarError, match="strang"):
        grammars.check(json_grammar({"type": "object", "properties": {"a": {"type": "strang"}}}))
    with pytest.raises(GrammarError, match="nope"):
        grammars.check(json_grammar({"$ref": "#/definitions/nope"}))
    with pytest.raises(GrammarError, match="name"):
        tool_call_grammar(model.tokenizer, [('bad" name', CITY)])
    matcher = grammars.matcher(json_grammar(CITY))
    with pytest.raises(GrammarError, match="does not continue"):
        matcher.advance(model.tokenizer.encode("x")[0])


def test_a_constraint_crosses_processes_unchanged(model):
    request = make_requests(model.config, [[1, 2, 3]], 8)[0]
    request = dataclasses.replace(request, constraint=Constraint(json_grammar(CITY), after=7))
    assert request_from_json(json.loads(json.dumps(request_to_json(request)))) == request


def request(model, prompt, max_new: int, seed: int = 0, temperature: float = 1.0, constraint=None, bias=()):
    r = make_requests(model.config, [prompt], max_new, temperature=temperature, seed=seed,
                      stop_token_ids=model.tokenizer.stop_ids)[0]
    return dataclasses.replace(r, sampling=dataclasses.replace(r.sampling, logit_bias=tuple(bias)),
                               constraint=constraint)


def run(scheduler: Scheduler, requests) -> list[tuple[list[int], str]]:
    """Submit all at once; each request's tokens and finish reason."""
    results, done = {}, threading.Event()

    def sink_for(i):
        tokens = []

        def sink(new, reason, logprobs=None):
            tokens.extend(new)
            if reason is not None:
                results[i] = (tokens, reason)
                if len(results) == len(requests):
                    done.set()
        return sink

    for i, r in enumerate(requests):
        scheduler.submit(r, sink_for(i))
    assert done.wait(300), f"{len(results)} of {len(requests)} finished"
    return [results[i] for i in range(len(requests))]


def test_fifty_sampled_json_schema_replies_validate(model, grammars):
    """Seeded, sampled at temperature 1, half of the batch unconstrained (they share the decode calls)."""
    tok = model.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe a user as JSON."}])
    scheduler = Scheduler(model.generator, max_batch=8, max_context=256, grammars=grammars).start()
    try:
        # 50 constrained, 10 free ones among them
        requests = [request(model, prompt, 160, seed, constraint=Constraint(json_grammar(SCHEMA)) if seed % 6 != 5
                            else None) for seed in range(60)]
        results = run(scheduler, requests)
    finally:
        scheduler.stop()
    replies = [tok.decode(t[:-1]) for (t, reason), r in zip(results, requests) if r.constraint is not None]
    assert len(replies) == 50
    assert all(reason == "stop" for _, reason in results)
    for text in replies:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(replies)) > 25  # sampled, not one reply 50 times
    free = [tok.decode(t) for (t, _), r in zip(results, requests) if r.constraint is None]
    assert sum(text.lstrip().startswith("{") for text in free) < len(free)  # the others are prose


def test_an_armed_constraint_starts_at_the_section_marker(model, grammars):
    """tool_choice auto: the model writes freely until it opens a tool-call section, then every call
    follows its schema. Asked about the weather, the embedded model opens one as its first token (made
    by prefill); greeted, with a logit bias on the marker, after some text (the decode call halts the
    row at the marker, and the row goes on constrained)."""
    tok = model.tokenizer
    marker = tok.special_ids[SECTION_BEGIN]
    weather, hello = (tok.apply_chat_template([{"role": "user", "content": text}])
                      for text in ("What is the weather in Paris?", "Hello, who are you?"))
    armed = Constraint(tool_call_grammar(tok, TOOLS, opened=True), after=marker)
    scheduler = Scheduler(model.generator, max_batch=8, max_context=256, grammars=grammars).start()
    try:
        requests = [request(model, prompt, 120, seed, constraint=armed, bias=bias)
                    for prompt, bias in ((weather, ()), (hello, [(marker, 10.0)])) for seed in range(12)]
        results = run(scheduler, requests)
    finally:
        scheduler.stop()
    schemas, opened_at = dict(TOOLS), []
    for tokens, reason in results:
        assert reason == "stop"
        if marker in tokens:
            opened_at.append(tokens.index(marker))
            _, calls = parse_tool_calls(tok.decode(tokens[:-1]))
            assert calls, tok.decode(tokens)
            for call in calls:
                jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
    assert opened_at.count(0) >= 12 and sum(i > 0 for i in opened_at) >= 1, opened_at


def test_a_grammar_that_does_not_compile_fails_its_request_alone(model, grammars):
    tok = model.tokenizer
    scheduler = Scheduler(model.generator, max_batch=2, max_context=128, grammars=grammars).start()
    try:
        good = request(model, tok.encode("Hi"), 16, temperature=0.0)
        broken = dataclasses.replace(good, constraint=Constraint('{"grammars": [{"lark_grammar": "start: @nowhere"}]}'))
        (_, reason_good), (_, reason_broken) = run(scheduler, [good, broken])
    finally:
        scheduler.stop()
    assert reason_good in ("stop", "length") and reason_broken.startswith("error: the grammar does not compile")


def test_the_step_callback_feeds_each_row_one_token_behind(model, grammars):
    """SlotConstraints.step_masks, as the decode loop calls it: a row's matcher takes the token made at
    the step before; a token outside the grammar (a bug) leaves the row only its end of turn."""
    from kimi_jax.runtime.constrained import SlotConstraints

    tok = model.tokenizer
    slots = SlotConstraints(grammars, 3)
    slots.admit(0, Constraint(json_grammar(CITY)), tok.stop_ids)
    slots.admit(2, Constraint(json_grammar(CITY)), tok.stop_ids)
    assert slots.active and slots.masks([1]) is None
    first = slots.masks([0, 1])
    assert {tok.decode([t]) for t in allowed_ids(first[0])} <= {"{", '{"', '{"city'} and (first[1] == -1).all()
    brace = tok.encode('{"')[0]
    generated, done = np.array([1, 1, 1]), np.array([False, False, False])
    masks = slots.step_masks(np.array([brace, 5, brace]), generated, done)
    assert (masks[1] == -1).all() and set(allowed_ids(masks[0])) == set(allowed_ids(masks[2]))
    again = slots.step_masks(np.array([brace, 5, brace]), generated, done)  # no new token: nothing fed
    np.testing.assert_array_equal(again, masks)
    wrong, fine = tok.encode("zzz")[0], int(allowed_ids(masks[2])[0])
    masks = slots.step_masks(np.array([wrong, 5, fine]), generated + 1, done)
    assert set(allowed_ids(masks[0])) == set(tok.stop_ids) and "does not continue" in slots.failure(0)
    assert slots.failure(2) is None and slots.active
    slots.free(0)
    assert slots.failure(0) is None


def test_a_preempted_constrained_reply_resumes_inside_its_grammar(model, grammars):
    """A pool too small for every slot: constrained sequences are preempted and recomputed (their
    matchers take the tokens made so far again), and each greedy reply equals the one made alone."""
    tok = model.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"A user, as JSON ({i})."}]) for i in range(4)]
    requests = [request(model, p, 40, temperature=0.0, constraint=Constraint(json_grammar(SCHEMA))) for p in prompts]
    alone = Scheduler(model.generator, max_batch=1, max_context=96, page_size=8, grammars=grammars).start()
    try:
        want = [run(alone, [r])[0] for r in requests]
    finally:
        alone.stop()
    tight = Scheduler(model.generator, max_batch=4, max_context=96, page_size=8, num_pages=12,
                      grammars=grammars).start()
    try:
        got = run(tight, requests)
    finally:
        tight.stop()
    assert tight.metrics.preemptions > 0 and got == want
    for tokens, reason in got:
        if reason == "stop":
            jsonschema.validate(json.loads(tok.decode(tokens[:-1])), SCHEMA)


def test_the_callback_cost_benchmark_times_both_kinds_of_call(model):
    """bench/constrained.callback_cost (BENCHMARKS.md "Constrained decoding"): every timed call made its
    steps (rows that ran out would time empty loops), the masked ones through the mask callback."""
    from kimi_jax.bench.constrained import callback_cost  # deferred: the bench layer sits above runtime

    calls = []
    decode = model.generator.decode

    def counting(cache, state, rows, steps, masks=None, **kw):
        out = decode(cache, state, rows, steps, masks=masks, **kw)
        calls.append((masks is not None, int((np.asarray(out[2]) >= 0).any(axis=1).sum())))
        return out

    model.generator.decode = counting
    try:
        r = callback_cost(model, streams=2, steps=2, calls=10)  # calls 0 and 8 prefill first: untimed
    finally:
        del model.generator.decode
    assert r["timed_calls"] == 8 and r["ms_per_step"]["free"] > 0 and r["ms_per_step"]["masked"] > 0
    assert [m for m, _ in calls] == [False, True] * 10
    assert all(made == 2 for _, made in calls), calls
