"""distshard reads safetensors headers itself (without mapping the file); it must accept exactly
the files safetensors accepts. A differential property test against ``safe_open``."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from distshard import DistShardError
from distshard.index import describe_file

DTYPES = ["F32", "F16", "BF16", "I64", "I32", "U8", "BOOL", "F64"]


def _split(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(path, header, body, header_len_delta=0, tail=b"", cut=0):
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", max(0, len(raw) + header_len_delta)) + raw + body + tail
    with open(path, "wb") as f:
        f.write(blob[:len(blob) - cut] if cut else blob)


mutation = st.one_of(
    st.tuples(st.just("offset"), st.integers(0, 2), st.integers(0, 1), st.integers(-8, 8)),
    st.tuples(st.just("shape"), st.integers(0, 2), st.integers(0, 1), st.integers(-2, 2)),
    st.tuples(st.just("dtype"), st.integers(0, 2), st.sampled_from(DTYPES), st.just(0)),
    st.tuples(st.just("drop"), st.integers(0, 2), st.just(0), st.just(0)),
    st.tuples(st.just("header_len"), st.just(0), st.just(0), st.integers(-3, 3)),
    st.tuples(st.just("tail"), st.just(0), st.just(0), st.integers(1, 9)),
    st.tuples(st.just("cut"), st.just(0), st.just(0), st.integers(1, 9)),
    # the header's entries in another order than their data (valid: the format does not say)
    st.tuples(st.just("reverse"), st.just(0), st.just(0), st.just(0)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(mutation, min_size=0, max_size=2))
def test_header_checks_agree_with_safetensors(tmp_path, mutations):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(3, 2), "b": torch.zeros(4, dtype=torch.int32),
               "c": torch.ones(2, 2, dtype=torch.float16)}, str(path))
    header, body = _split(path)
    keys = sorted(k for k in header if k != "__metadata__")
    delta, tail, cut = 0, b"", 0
    for kind, i, j, d in mutations:
        key = keys[i % len(keys)]
        entry = header.get(key)
        if kind == "header_len":
            delta = d
        elif kind == "tail":
            tail = b"x" * d
        elif kind == "cut":
            cut = d
        elif kind == "reverse":
            header = dict(reversed(header.items()))
        elif entry is None:
            continue
        elif kind == "offset":
            entry["data_offsets"][j] = max(0, entry["data_offsets"][j] + d)
        elif kind == "shape" and entry["shape"]:
            entry["shape"][j % len(entry["shape"])] = max(0, entry["shape"][j % len(entry["shape"])] + d)
        elif kind == "dtype":
            entry["dtype"] = j
        elif kind == "drop":
            del header[key]
    _join(path, header, body, delta, tail, cut)
    try:
        with safe_open(str(path), framework="pt") as f:
            theirs = sorted(f.keys())
    except Exception:
        theirs = None
    try:
        ours = sorted(describe_file(str(tmp_path), "m.safetensors", "safetensors").tensors)
    except DistShardError as e:
        assert "m.safetensors" in str(e)
        ours = None
    assert ours == theirs, f"mutations {mutations}: distshard {ours}, safetensors {theirs}"


@pytest.mark.parametrize("header", [b"\x00" * 8, b""])
def test_too_short_files_are_refused(tmp_path, header):
    (tmp_path / "m.safetensors").write_bytes(header)
    with pytest.raises(DistShardError, match="not a valid safetensors"):
        describe_file(str(tmp_path), "m.safetensors", "safetensors")
