"""Tests for kimi_jax.safetensors_io, with the official `safetensors` package as the oracle."""

import json
import mmap
import os
import sys

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from kimi_jax.checkpoint import safetensors as sio
from kimi_jax.checkpoint.safetensors import (
    SafetensorsError,
    SafetensorsFile,
    ShardedCheckpointReader,
    read_index,
    save_file,
    write_index,
)

pytestmark = pytest.mark.unit

RNG = np.random.default_rng(0)


def _random_bits(shape, dtype):
    """Every bit pattern is fair game (NaNs, negative zero, subnormals): compare raw bytes."""
    dtype = np.dtype(dtype)
    raw = RNG.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def _torch_bits(shape, torch_dtype):
    n = torch.empty((), dtype=torch_dtype).element_size()
    raw = torch.randint(0, 256, (int(np.prod(shape)) * n,), dtype=torch.uint8)
    return raw.view(torch_dtype).reshape(shape)


def _torch_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _np_bytes(a):
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).tobytes()


def _craft(path, header, data=b"", header_len=None):
    """Write a file with an arbitrary (possibly invalid) header and data buffer."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(blob) if header_len is None else header_len
    with open(path, "wb") as f:
        f.write(n.to_bytes(8, "little") + blob + data)
    return str(path)


def _entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# -- interop with the reference implementation ----------------------------------------------


def test_reads_files_written_by_reference(tmp_path):
    tensors = {
        "model.layers.0.self_attn.q_a_proj.weight": _torch_bits((6, 130), torch.float8_e4m3fn),
        "model.layers.0.self_attn.q_a_proj.weight_scale_inv": torch.randn(1, 2),
        "model.embed_tokens.weight": _torch_bits((11, 7), torch.bfloat16),
        "ids": torch.randint(-2**62, 2**62, (5,), dtype=torch.int64),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    with SafetensorsFile(path) as f:
        assert sorted(f.keys()) == sorted(tensors)
        assert f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            arr = f.get(name)
            assert arr.shape == tuple(t.shape)
            assert _np_bytes(arr) == _torch_bytes(t), name
        assert f.get("model.embed_tokens.weight").dtype == ml_dtypes.bfloat16
        info = f.info("model.layers.0.self_attn.q_a_proj.weight")
        assert info == sio.TensorInfo(np.dtype(ml_dtypes.float8_e4m3fn), (6, 130), 780)


def test_reference_reads_our_files(tmp_path):
    tensors = {
        "fp8": _random_bits((9, 17), ml_dtypes.float8_e4m3fn),
        "e5m2": _random_bits((4,), ml_dtypes.float8_e5m2),
        "bf16": _random_bits((3, 5, 2), ml_dtypes.bfloat16),
        "f32": RNG.standard_normal((7, 3)).astype(np.float32),
        "f16": RNG.standard_normal((2,)).astype(np.float16),
        "i64": RNG.integers(-2**62, 2**62, (6,)),
        "i32": RNG.integers(-5, 5, (2, 2)).astype(np.int32),
        "u8": RNG.integers(0, 255, (3,)).astype(np.uint8),
        "bool": np.array([True, False, True]),
        "big_endian": np.arange(4, dtype=">f4"),
        "strided": np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2],
    }
    path = tmp_path / "ours.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "kimi"})
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "kimi"}
        assert sorted(f.keys()) == sorted(tensors)
        for name, arr in tensors.items():
            t = f.get_tensor(name)
            assert tuple(t.shape) == arr.shape, name
            expected = arr.astype("<f4") if name == "big_endian" else arr
            assert _torch_bytes(t) == _np_bytes(expected), name
        assert f.get_tensor("fp8").dtype == torch.float8_e4m3fn
        assert f.get_tensor("bf16").dtype == torch.bfloat16
    assert os.path.getsize(path) >= 8 and (int.from_bytes(path.read_bytes()[:8], "little") % 8) == 0


def test_same_bytes_as_reference_for_one_dtype(tmp_path):
    # The reference orders by dtype alignment then name; with one dtype both orders agree.
    tensors = {"b.w": torch.randn(3, 5), "a.w": torch.randn(7), "c": torch.randn(2, 2)}
    safetensors.torch.save_file(tensors, str(tmp_path / "ref"), metadata={"format": "pt"})
    save_file({k: v.numpy() for k, v in tensors.items()}, tmp_path / "ours", {"format": "pt"})
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "ref").read_bytes()


# -- zero-copy reads ------------------------------------------------------------------------


def _backed_by_mmap(arr):
    obj = arr
    while obj is not None:
        if isinstance(obj, mmap.mmap):
            return True
        obj = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
    return False


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_get_is_zero_copy_and_read_only(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": np.arange(64, dtype=np.float32).reshape(8, 8)}, path)
    f = SafetensorsFile(path)
    w = f.get("w")
    assert _backed_by_mmap(w) and not w.flags.writeable
    with pytest.raises(ValueError):
        w[0, 0] = 1.0
    rows = f.get_slice("w", slice(2, 4))
    assert _backed_by_mmap(rows) and np.shares_memory(rows, w)
    np.testing.assert_array_equal(rows, np.arange(16, 32, dtype=np.float32).reshape(2, 8))
    np.testing.assert_array_equal(f.get_slice("w", (1, slice(None, None, 4))), [8, 12])
    f.close()
    # Views outlive close(): the mapping stays until they are collected.
    assert float(w.sum()) == float(np.arange(64).sum())
    with pytest.raises(ValueError, match="closed"):
        f.get("w")


def test_get_slice_rejects_advanced_and_out_of_range(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": np.zeros((4, 3), np.float32)}, path)
    with SafetensorsFile(path) as f:
        with pytest.raises(TypeError, match=r"'w'.*\[4, 3\]"):
            f.get_slice("w", [0, 2])
        with pytest.raises(TypeError, match="at most 2 leading dims"):
            f.get_slice("w", (0, 0, 0))
        with pytest.raises(IndexError, match=r"'w'.*\[4, 3\]"):
            f.get_slice("w", 9)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_large_file_read_does_not_raise_rss(tmp_path):
    path = tmp_path / "big.safetensors"
    size = 256 * 1024 * 1024
    with open(path, "wb") as fh:  # sparse file: no need to hold 256 MB in memory to write it
        header = json.dumps({"big": _entry("U8", [size // 4096, 4096], 0, size)}).encode()
        fh.write(len(header).to_bytes(8, "little") + header)
        fh.truncate(8 + len(header) + size)
    before = _rss_bytes()
    with SafetensorsFile(path) as f:
        big = f.get("big")
        assert int(f.get_slice("big", slice(0, 4)).sum()) == 0  # touches 16 KB only
        assert _rss_bytes() - before < 32 * 1024 * 1024
        del big


# -- validation errors ----------------------------------------------------------------------

W = "model.layers.0.mlp.down_proj.weight"


@pytest.mark.parametrize("header, data, header_len, expected", [
    ({W: _entry("F32", [4], 0, 16)}, b"\0" * 8, None,
     ["bad.safetensors", "file is truncated", W, "re-download the shard"]),
    ({W: _entry("F32", [4], 0, 16)}, b"", 10_000, ["bad.safetensors", "header length 10000", "beyond"]),
    ({}, b"", 200 * 1024 * 1024, ["bad.safetensors", "exceeds"]),
    (b"{not json", b"", None, ["bad.safetensors", "not valid UTF-8 JSON"]),
    (b"\xff\xfe{}", b"", None, ["bad.safetensors", "not valid UTF-8 JSON"]),
    (b"[1, 2]", b"", None, ["bad.safetensors", "must be a JSON object", "list"]),
    ({W: _entry("F4", [4], 0, 2)}, b"\0" * 2, None, ["bad.safetensors", W, "unknown dtype 'F4'", "F8_E4M3"]),
    ({W: _entry("F8_E4M3", [64, 64], 0, 2048)}, b"\0" * 4096, None,
     [f"bad.safetensors: tensor '{W}' needs 4096 bytes (shape [64, 64], F8_E4M3) "
      "but its data_offsets span 2048"]),
    ({W: _entry("F32", [4], 0, 16), "b": _entry("F32", [2], 8, 16)}, b"\0" * 16, None,
     ["bad.safetensors", "overlap", W, "'b'"]),
    ({W: _entry("F32", [-1, 4], 0, 16)}, b"\0" * 16, None, ["bad.safetensors", W, "non-negative ints", "-1"]),
    ({W: _entry("F32", [2.0], 0, 8)}, b"\0" * 8, None, ["bad.safetensors", W, "non-negative ints", "2.0"]),
    ({W: _entry("F32", [True], 0, 4)}, b"\0" * 4, None, ["bad.safetensors", W, "non-negative ints"]),
    ({W: _entry("F32", [0], 8, 0)}, b"\0" * 8, None, ["bad.safetensors", W, "begin <= end", "[8, 0]"]),
    ({W: _entry("F32", [1], -4, 0)}, b"\0" * 8, None, ["bad.safetensors", W, "begin <= end"]),
    ({W: {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}}, b"\0" * 4, None,
     ["bad.safetensors", W, "two ints"]),
    ({W: {"dtype": "F32", "shape": [1]}}, b"\0" * 4, None, ["bad.safetensors", W, "data_offsets"]),
    ({W: _entry("F32", [1], 0, 4), "__metadata__": {"k": 1}}, b"\0" * 4, None,
     ["bad.safetensors", "__metadata__", "str to str"]),
    (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
     b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"\0", None,
     ["bad.safetensors", "duplicate key 'a'"]),
])
def test_validation_errors(tmp_path, header, data, header_len, expected):
    path = _craft(tmp_path / "bad.safetensors", header, data, header_len)
    with pytest.raises(SafetensorsError) as err:
        SafetensorsFile(path)
    assert isinstance(err.value, ValueError)
    for part in expected:
        assert part in str(err.value), (part, str(err.value))


def test_file_shorter_than_length_prefix(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsError, match="tiny.safetensors.*too short"):
        SafetensorsFile(path)


def test_unknown_tensor_suggests_close_names(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({W: np.zeros(2, np.float32), "lm_head.weight": np.zeros(2, np.float32)}, path)
    with SafetensorsFile(path) as f:
        with pytest.raises(KeyError) as err:
            f.get("model.layers.0.mlp.down_proj.weights")
    msg = str(err.value)
    assert "x.safetensors" in msg and "down_proj.weights" in msg and repr(W) in msg


def test_save_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(SafetensorsError, match="'c'.*complex64"):
        save_file({"c": np.zeros(2, np.complex64)}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save_file({"old": np.ones(3, np.float32)}, path)
    old_bytes = path.read_bytes()
    calls = []

    def failing_write(f, arr):
        calls.append(arr)
        if len(calls) == 2:  # half the data is on disk when the "crash" happens
            raise OSError("disk full")
        f.write(arr.reshape(-1).view(np.uint8))

    monkeypatch.setattr(sio, "_write_array", failing_write)
    tensors = {"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float32)}
    with pytest.raises(OSError, match="disk full"):
        save_file(tensors, path)
    assert path.read_bytes() == old_bytes  # the previous complete file is untouched
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        save_file(tensors, tmp_path / "new.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["ckpt.safetensors"]  # no final file, no .tmp


# -- sharded checkpoints --------------------------------------------------------------------


def _write_sharded(directory):
    shards = {
        "model-00001-of-00002.safetensors": {"model.embed_tokens.weight": _random_bits((4, 8), ml_dtypes.bfloat16),
                                             W: _random_bits((8, 4), ml_dtypes.float8_e4m3fn)},
        "model-00002-of-00002.safetensors": {f"{W}_scale_inv": np.ones((1, 1), np.float32),
                                             "lm_head.weight": _random_bits((4, 8), ml_dtypes.bfloat16)},
    }
    weight_map, total = {}, 0
    for shard, tensors in shards.items():
        save_file(tensors, directory / shard, {"format": "pt"})
        weight_map.update({name: shard for name in tensors})
        total += sum(t.nbytes for t in tensors.values())
    write_index(directory, weight_map, total)
    return shards, weight_map


def test_sharded_round_trip(tmp_path):
    shards, weight_map = _write_sharded(tmp_path)
    assert read_index(tmp_path) == weight_map
    index = json.loads((tmp_path / sio.INDEX_FILENAME).read_text())
    assert index["metadata"]["total_size"] == 32 * 2 + 32 + 4 + 64
    with ShardedCheckpointReader(tmp_path) as r:
        assert sorted(r.keys()) == sorted(weight_map) and W in r and "nope" not in r
        assert r._files == {}  # nothing opened until asked
        assert r.info(W).shape == (8, 4)
        assert list(r._files) == ["model-00001-of-00002.safetensors"]
        for tensors in shards.values():
            for name, arr in tensors.items():
                assert _np_bytes(r.get(name)) == _np_bytes(arr)
        assert len(r._files) == 2


def test_single_file_fallback(tmp_path):
    save_file({"a": np.zeros(2, np.float32)}, tmp_path / "model.safetensors")
    assert read_index(tmp_path) == {"a": "model.safetensors"}
    with ShardedCheckpointReader(tmp_path) as r:
        assert r.get("a").tolist() == [0.0, 0.0]


def test_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json"):
        read_index(tmp_path)


def test_missing_shard_is_named(tmp_path):
    _write_sharded(tmp_path)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError) as err:
        read_index(tmp_path)
    msg = str(err.value)
    assert "model-00002-of-00002.safetensors" in msg and "1 of 2" in msg
    assert "model-00001-of-00002" not in msg.split("directory")[-1].split(":", 1)[-1]


def test_index_shard_outside_directory_rejected(tmp_path):
    write_index(tmp_path, {"a": "../escape.safetensors"}, 0)
    with pytest.raises(SafetensorsError, match="bare filenames"):
        read_index(tmp_path)


def test_malformed_index(tmp_path):
    (tmp_path / sio.INDEX_FILENAME).write_text('{"metadata": {}}')
    with pytest.raises(SafetensorsError, match="weight_map"):
        read_index(tmp_path)


def test_sharded_missing_tensor_messages(tmp_path):
    _write_sharded(tmp_path)
    with ShardedCheckpointReader(tmp_path) as r:
        with pytest.raises(KeyError) as err:
            r.get("lm_head.weights")
        msg = str(err.value)
        assert str(tmp_path) in msg and "'lm_head.weights'" in msg and "'lm_head.weight'" in msg
    # Index and shard disagree: the message says what the index claims.
    weight_map = read_index(tmp_path)
    weight_map["ghost"] = "model-00001-of-00002.safetensors"
    write_index(tmp_path, weight_map, 0)
    with ShardedCheckpointReader(tmp_path) as r:
        with pytest.raises(KeyError, match="index says tensor 'ghost' is in model-00001-of-00002"):
            r.info("ghost")
