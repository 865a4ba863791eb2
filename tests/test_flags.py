"""Command-line and config hygiene (issue 16): every bad flag of serve, generate, plan and convert, and
every mistyped or out-of-range config.json value, is one line naming it, never a traceback.

The command lines run in process (their `main`): argparse errors exit 2 with one `error:` line, the
rest return 1 with one; an exception escaping `main` would fail the test with its traceback.
"""

from __future__ import annotations

import json
import math

import pytest

from kimi_jax import convert, generate, plan
from kimi_jax.config import Config, ConfigError
from kimi_jax.runtime import flags
from kimi_jax.runtime.default_model import TINY_CHAT
from kimi_jax.serve import cli as serve

pytestmark = pytest.mark.unit

CONFIG = TINY_CHAT / "config.json"
PLAN = ["--config", "tiny-kimi", "--mesh", "expert=2"]


def _one_error_line(run, argv, capsys) -> str:
    """Run a command line's main on argv: a non-zero exit and exactly one `error:` line, returned."""
    try:
        code = run(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert code not in (0, None) and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _bad_config(tmp_path, **changes):
    d = json.loads(CONFIG.read_text())
    d.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(d))
    return str(tmp_path)


@pytest.mark.parametrize("argv, says", [
    (["--max-batch", "0"], "argument --max-batch: must be an integer ≥ 1, got 0"),
    (["--max-context", "1"], "argument --max-context: must be an integer ≥ 2, got 1"),
    (["--port", "99999"], "argument --port: must be an integer in [0, 65535], got 99999"),
    (["--port", "-1"], "argument --port: must be an integer in [0, 65535], got -1"),
    (["--max-body-bytes", "0"], "argument --max-body-bytes: must be an integer ≥ 1, got 0"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["--checkpoint", "/nonexistent"], "argument --checkpoint: checkpoint directory /nonexistent does not exist"),
    (["--checkpoint", str(CONFIG)], f"argument --checkpoint: {CONFIG} is a file; pass the checkpoint directory"),
    (["--num-cpu-devices", "0"], "argument --num-cpu-devices: must be an integer ≥ 1, got 0"),
    (["--host", "999.1.1.1"], "error: --host 999.1.1.1 --port 8000: cannot listen there"),
    (["--mesh", "expert=3", "--port", "0"], "mesh data=1,expert=3,tensor=1 needs 3 devices but 8 are available"),
])
def test_serve_flags(argv, says, capsys):
    assert says in _one_error_line(serve.main, argv, capsys)


def test_serve_config_values_are_named(tmp_path, capsys):
    line = _one_error_line(serve.main, ["--checkpoint", _bad_config(tmp_path, rms_norm_eps=-1), "--port", "0"],
                           capsys)
    assert line == "error: config field 'rms_norm_eps' must be a finite number > 0, got -1"


@pytest.mark.parametrize("argv, says", [
    (["--temperature", "inf"], "argument --temperature: must be a finite number ≥ 0, got inf"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number ≥ 0, got nan"),
    (["--temperature", "-1"], "argument --temperature: must be a finite number ≥ 0, got -1"),
    (["--top-p", "0"], "argument --top-p: must be a finite number in (0, 1], got 0"),
    (["--top-k", "-1"], "argument --top-k: must be an integer ≥ 0, got -1"),
    (["--seed", "-1"], "argument --seed: must be an integer in [0, 4294967295], got -1"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer ≥ 1, got 0"),
    (["--checkpoint", str(CONFIG)], f"argument --checkpoint: {CONFIG} is a file; pass the checkpoint directory"),
    (["--checkpoint", "/nonexistent"], "argument --checkpoint: checkpoint directory /nonexistent does not exist"),
])
def test_generate_flags(argv, says, capsys):
    assert says in _one_error_line(generate.main, ["--prompt", "hi", *argv], capsys)


def test_generate_config_values_are_named(tmp_path, capsys):
    line = _one_error_line(generate.main, ["--prompt", "hi", "--checkpoint",
                                           _bad_config(tmp_path, num_experts_per_tok=True)], capsys)
    assert line == "error: config field 'num_experts_per_tok' must be an integer ≥ 1, got True"


@pytest.mark.parametrize("argv, says", [
    (["--batch", "0", "--context", "8"], "argument --batch: must be an integer ≥ 1, got 0"),
    (["--batch", "1", "--context", "-1"], "argument --context: must be an integer ≥ 1, got -1"),
    (["--batch", "1", "--context", "8", "--prefill-batch", "0"], "argument --prefill-batch: must be an integer ≥ 1"),
    (["--batch", "1", "--context", "8", "--prefill-chunk", "-5"], "argument --prefill-chunk: must be an integer ≥ 1"),
    (["--batch", "x", "--context", "8"], "argument --batch: expected an integer, got 'x'"),
])
def test_plan_flags(argv, says, capsys):
    assert says in _one_error_line(plan.main, PLAN + argv, capsys)


def test_plan_config_values_are_named(tmp_path, capsys):
    line = _one_error_line(plan.main, ["--config", _bad_config(tmp_path, rope_scaling={"type": "yarn", "factor": "x"}),
                                       "--mesh", "expert=2", "--batch", "1", "--context", "8"], capsys)
    assert line == "error: config field 'rope_scaling.factor' must be a finite number > 0, got 'x'"


@pytest.mark.parametrize("argv, says", [
    (["--hf", str(CONFIG)], f"argument --hf: {CONFIG} is a file; pass the Hugging Face checkpoint directory"),
    (["--hf", "/nonexistent"], "argument --hf: Hugging Face checkpoint directory /nonexistent does not exist"),
    (["--hf", str(TINY_CHAT), "--quantize", "int2"], "argument --quantize: invalid choice: 'int2'"),
])
def test_convert_flags(argv, says, tmp_path, capsys):
    assert says in _one_error_line(convert.main, [*argv, "--out", str(tmp_path / "out")], capsys)


def test_convert_config_values_are_named(tmp_path, capsys):
    line = _one_error_line(convert.main, ["--hf", _bad_config(tmp_path, num_attention_heads="4"),
                                          "--out", str(tmp_path / "out")], capsys)
    assert line == "error: config field 'num_attention_heads' must be an integer ≥ 1, got '4'"


@pytest.mark.parametrize("changes, says", [
    ({"num_experts_per_tok": True}, "'num_experts_per_tok' must be an integer ≥ 1, got True"),
    ({"rms_norm_eps": -1}, "'rms_norm_eps' must be a finite number > 0, got -1"),
    ({"rms_norm_eps": 0}, "'rms_norm_eps' must be a finite number > 0, got 0"),
    ({"num_attention_heads": "4", "num_key_value_heads": 4}, "'num_attention_heads' must be an integer ≥ 1, got '4'"),
    ({"rope_scaling": {"type": "yarn", "factor": "x"}}, "'rope_scaling.factor' must be a finite number > 0, got 'x'"),
    ({"rope_scaling": {"type": "yarn", "factor": -2}}, "'rope_scaling.factor' must be a finite number > 0, got -2"),
    ({"rope_scaling": {"type": "yarn", "original_max_position_embeddings": 1.5}},
     "'rope_scaling.original_max_position_embeddings' must be an integer ≥ 1, got 1.5"),
    ({"rope_scaling": "yarn"}, "'rope_scaling' must be an object, got 'yarn'"),
    ({"rope_theta": "big"}, "'rope_theta' must be a finite number > 0, got 'big'"),
    ({"routed_scaling_factor": 0}, "'routed_scaling_factor' must be a finite number > 0, got 0"),
    ({"norm_topk_prob": "yes"}, "'norm_topk_prob' must be a boolean (true or false), got 'yes'"),
    ({"first_k_dense_replace": -1}, "'first_k_dense_replace' must be an integer ≥ 0, got -1"),
    ({"max_position_embeddings": 0}, "'max_position_embeddings' must be an integer ≥ 1, got 0"),
    ({"vocab_size": 1024.0}, "'vocab_size' must be an integer ≥ 1, got 1024.0"),
    ({"num_key_value_heads": True}, "'num_key_value_heads' must be an integer ≥ 1, got True"),
    ({"eos_token_id": -3}, "'eos_token_id' must be an integer ≥ 0, got -3"),
])
def test_config_types_and_ranges_name_the_field(changes, says):
    d = json.loads(CONFIG.read_text())
    d.update(changes)
    with pytest.raises(ConfigError) as err:
        Config.from_hf_dict(d)
    assert str(err.value) == f"config field {says}"


def test_flag_types_refuse_non_finite_and_out_of_range():
    assert flags.real(0)("0.5") == 0.5 and flags.integer(1, 3)("3") == 3 and flags.SEED("4294967295") == 2**32 - 1
    for parse, text in [(flags.real(0), "inf"), (flags.real(0), "-inf"), (flags.real(0, 1), "1.5"),
                        (flags.real(0, 1, open_lo=True), "0"), (flags.integer(0, 9), "10"), (flags.PORT, "1e3")]:
        with pytest.raises(Exception, match="must be|expected"):
            parse(text)
    assert math.isfinite(flags.real(0)("1e308"))
