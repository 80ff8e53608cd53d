"""The key mapping is pure: unit tests and property tests, no processes, no files.

The property test plans random renames, stacks, concatenations and slices over random shard
boxes, reads each rank's pieces from an in-memory "file" as the engine does (the plan's byte
ranges, the pieces each box takes of each slot, and the byte range of a piece a rank reads
itself), and compares with the same operations applied to full tensors in one process.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distshard.routes.own_rows import start_in_slot as _start_in_slot
from distshard.hfkeys import TransformersRules
from distshard.index import FileInfo, TensorInfo
from distshard.keymap import (
    KeyMap,
    RegexRules,
    chunk_sizes,
    concat,
    contiguous_start,
    leaf,
    region,
    split,
    stack,
)
from distshard.plan import make_plan, payload_layout
from distshard.validate import explain
from zoo import ZOO

DTYPES = [torch.float32, torch.int16, torch.uint8, torch.float64]


def assemble(formed, sources: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor ``formed`` describes, built from its parts alone."""
    out = torch.full(formed.shape, -1, dtype=next(iter(sources.values())).dtype)
    for p in formed.parts:
        src = sources[p.source][region(p.source_box, None)]
        out[region(p.box, None)] = src.reshape(p.box[1])
    return out


# --- the algebra ------------------------------------------------------------------------------

def test_stack_concat_split_equal_torch():
    torch.manual_seed(0)
    a, b, c = (torch.randn(3, 4) for _ in range(3))
    src = {"a": a, "b": b, "c": c}
    leaves = [leaf(k, v.shape) for k, v in src.items()]
    for dim in (0, 1, 2, -1):
        assert torch.equal(assemble(stack(leaves, dim), src), torch.stack([a, b, c], dim))
    for dim in (0, 1):
        assert torch.equal(assemble(concat(leaves, dim), src), torch.cat([a, b, c], dim))
    fused = concat([stack(leaves[:2], 0), stack(leaves[1:], 0)], 1)  # MoE gate_up style
    want = torch.cat([torch.stack([a, b]), torch.stack([b, c])], 1)
    assert torch.equal(assemble(fused, src), want)
    for got, piece in zip(split(fused, 1, [2, 4]), torch.split(want, [2, 4], 1)):
        assert torch.equal(assemble(got, src), piece)


def test_shapes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="stack"):
        stack([leaf("a", (2, 3)), leaf("b", (3, 2))], 0)
    with pytest.raises(ValueError, match="concatenate"):
        concat([leaf("a", (2, 3)), leaf("b", (3, 2))], 0)
    with pytest.raises(ValueError, match="split"):
        split(leaf("a", (4, 3)), 0, [1, 2])


def test_chunk_sizes_follow_torch_chunk():
    for n in range(0, 12):
        for chunks in range(1, 6):
            want = [t.shape[0] for t in torch.chunk(torch.empty(n), chunks)] if n else []
            assert chunk_sizes(n, chunks)[:len(want)] == want


def test_a_slice_across_the_rows_of_a_source_is_not_contiguous():
    (left, _) = split(leaf("w", (4, 6)), 1, [3, 3])
    assert not left.contiguous_sources({"w": (4, 6)})
    (top, _) = split(leaf("w", (4, 6)), 0, [1, 3])
    assert top.contiguous_sources({"w": (4, 6)})
    assert contiguous_start(((1, 2, 0), (1, 1, 5)), (2, 3, 5)) == 25


def test_regex_rules_rename_in_order_and_report_what_matched_nothing():
    rules = RegexRules({r"^backbone\.": "", r"\.gamma$": ".weight", r"^nothing": "x"})
    keymap = rules.map({"backbone.ln.gamma": ((2,), torch.float32),
                        "extra": ((1,), torch.float32)}, ["ln.weight"])
    assert keymap.renamed == {"backbone.ln.gamma": "ln.weight"}
    assert keymap.unexpected == ("extra",) and keymap.unmatched_rules == (r"^nothing",)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        RegexRules({"(": ""})


def test_two_checkpoint_keys_forming_one_model_key_are_refused():
    with pytest.raises(ValueError, match="both form model key 'w'"):
        RegexRules({r"^(a|b)$": "w"}).map({"a": ((1,), torch.float32),
                                            "b": ((1,), torch.float32)}, ["w"])


def test_explain_names_a_prefix_that_differs():
    base = KeyMap({}, (), (), {})
    assert "key_mapping={'^': 'model.'}" in explain(["model.a", "model.b"], ["a", "b"], base)[0]
    hint = explain(["a.w"], ["backbone.a.w"], base)[0]
    assert "extra prefix 'backbone.'" in hint and r"'^backbone\\.': ''" in hint
    assert explain(["x"], ["y"], KeyMap({}, (), (), {}, ("^z",))) == [
        "key_mapping pattern '^z' matched no checkpoint key"]


# --- property: planned over shard boxes, equal to full tensors ------------------------------------

@st.composite
def formations(draw):
    """A random formation of one or more model tensors from random checkpoint tensors."""
    rank = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    kind = draw(st.sampled_from(["rename", "stack", "moe", "concat", "split", "stack-split"]))
    n = draw(st.integers(1, 4))
    shapes: dict[str, tuple[int, ...]] = {}

    def leaves(k, shp):
        out = []
        for _ in range(k):
            shapes[f"src{len(shapes)}"] = shp
            out.append(leaf(f"src{len(shapes) - 1}", shp))
        return out

    if kind == "rename":
        formed = {"t0": leaves(1, shape)[0]}
    elif kind == "stack":
        formed = {"t0": stack(leaves(n, shape), draw(st.integers(0, rank)))}
    elif kind == "moe":  # experts of gate and up, stacked, then concatenated
        formed = {"t0": concat([stack(leaves(n, shape), 0), stack(leaves(n, shape), 0)],
                               draw(st.integers(1, rank)))}
    elif kind == "concat":
        dim = draw(st.integers(0, rank - 1))
        sizes = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
        formed = {"t0": concat([leaves(1, shape[:dim] + (s,) + shape[dim + 1:])[0]
                                for s in sizes], dim)}
    else:
        item = leaves(1, shape)[0] if kind == "split" else stack(leaves(n, shape), 0)
        dim = draw(st.integers(0, len(item.shape) - 1))
        cuts = sorted(draw(st.lists(st.integers(0, item.shape[dim]), max_size=3)))
        bounds = [0, *cuts, item.shape[dim]]
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        formed = {f"t{i}": f for i, f in enumerate(split(item, dim, sizes))}
    return formed, shapes


def _box(draw, shape):
    offset, size = [], []
    for n in shape:
        lo = draw(st.integers(0, n))
        offset.append(lo)
        size.append(draw(st.integers(0, n - lo)))
    return tuple(offset), tuple(size)


@settings(max_examples=300, deadline=None)
@given(example=formations(), dtype=st.sampled_from(DTYPES), data=st.data(),
       bucket_size=st.integers(1, 200), world_size=st.integers(1, 4))
def test_planned_boxes_equal_the_operations_on_full_tensors(example, dtype, data, bucket_size,
                                                            world_size):
    formed, shapes = example
    torch.manual_seed(0)
    sources = {key: (torch.randn(shape) * 50).to(dtype) for key, shape in shapes.items()}
    for name, f in list(formed.items()):
        if not f.contiguous_sources(shapes):
            formed.pop(name)  # planned as a conversion of whole tensors instead
    # one in-memory file holding every source, in name order
    blob, infos, begin = bytearray(), {}, 0
    for key in sorted(sources):
        raw = sources[key].contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        infos[key] = TensorInfo(dtype, tuple(sources[key].shape), begin)
        blob += raw
        begin += len(raw)
    parts = {}
    for name, f in formed.items():
        for p in f.named(name):
            parts.setdefault(p.source, []).append(p)
    used = {k: t for k, t in infos.items() if k in parts}
    if not used:
        return
    plan = make_plan([FileInfo("f", "safetensors", len(blob), 0, used)], world_size,
                     bucket_size, parts=parts)
    data_bytes = torch.frombuffer(blob or bytearray(1), dtype=torch.uint8)
    for name, f in formed.items():
        want = assemble(f, sources) if f.parts else torch.empty(f.shape, dtype=dtype)
        box = _box(data.draw, f.shape)
        got = torch.full(box[1], -1, dtype=dtype)
        filled = 0
        for bucket in plan.buckets:
            pieces, _ = payload_layout(bucket, {name: box})
            for piece in pieces:
                if piece.slot.key != name or piece.nbytes == 0:
                    continue
                slot = piece.slot
                held = data_bytes[slot.begin:slot.begin + slot.nbytes].view(dtype).view(slot.shape)
                got[region(piece.box, box[0])] = held[region(piece.box, slot.extent[0])]
                start = _start_in_slot(piece)  # as a rank reading its own piece would
                if start is not None:
                    at = slot.begin + start * dtype.itemsize
                    direct = data_bytes[at:at + piece.nbytes].view(dtype).view(piece.box[1])
                    assert torch.equal(direct, held[region(piece.box, slot.extent[0])])
                filled += piece.nbytes
        assert filled == torch.empty(box[1], dtype=dtype).nbytes
        assert torch.equal(got, want[region(box, None)]), name


# --- transformers' rules, read as boxes ---------------------------------------------------------

def _meta_model(model_type: str, cls: str, **kwargs):
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    with init_empty_weights():
        return getattr(transformers, cls).from_config(AutoConfig.for_model(model_type, **kwargs))


MOE = dict(num_hidden_layers=1, hidden_size=8, intermediate_size=16, num_attention_heads=2,
           num_key_value_heads=1, vocab_size=16, num_local_experts=3, num_experts=3,
           num_experts_per_tok=2, moe_intermediate_size=4)


def _specs(model):
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def test_fused_experts_are_boxes_of_the_one_tensor_per_expert_checkpoint():
    from transformers.core_model_loading import revert_weight_conversion

    model = _meta_model("mixtral", "AutoModelForCausalLM", **MOE)
    torch.manual_seed(0)
    state = {k: torch.randn(shape) for k, (shape, _) in _specs(model).items()}
    hub = revert_weight_conversion(model, state)  # what save_pretrained writes
    assert any(".experts.2.w3.weight" in k for k in hub)
    keymap = TransformersRules(model).map({k: (tuple(v.shape), v.dtype) for k, v in hub.items()},
                                          _specs(model))
    assert not keymap.conversions and not keymap.unexpected
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    assert len(keymap.parts[fused]) == 2 * 3
    for target, parts in keymap.parts.items():
        from distshard.keymap import Formed

        assert torch.equal(assemble(Formed(state[target].shape, parts), hub), state[target]), target


def test_a_transposed_layout_is_a_conversion_run_by_transformers():
    model = _meta_model("qwen3_vl_moe", "AutoModelForImageTextToText", text_config=dict(
        MOE, head_dim=4, moe_intermediate_size=6,
        rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 0]}),
        vision_config=dict(depth=1, hidden_size=8, intermediate_size=16, num_heads=2,
                           out_hidden_size=8, patch_size=4, spatial_merge_size=1,
                           temporal_patch_size=1, deepstack_visual_indexes=[0]))
    specs = _specs(model)
    hub = {k: ((s[0], s[2], s[1]) if ".experts." in k else s, d) for k, (s, d) in specs.items()}
    rules = TransformersRules(model)
    keymap = rules.map(hub, specs)
    fused = [c for c in keymap.conversions if c.targets[0].endswith("experts.gate_up_proj")]
    assert fused and fused[0].name == "Transpose" and not keymap.unexpected
    source = torch.randn(hub[fused[0].sources[0]][0])
    out = rules.convert(fused[0], {fused[0].sources[0]: source})
    assert torch.equal(out[fused[0].targets[0]], source.transpose(1, 2))
    # the model's own layout: Transpose(check_dims) leaves it as it is, so it is read as boxes
    assert not TransformersRules(model).map(specs, specs).conversions


def test_the_base_model_prefix_is_added_or_stripped_as_transformers_does():
    causal = _meta_model("llama", "AutoModelForCausalLM", **MOE)
    base_keys = {k.removeprefix("model."): v for k, v in _specs(causal).items()
                 if k.startswith("model.")}
    keymap = TransformersRules(causal).map(base_keys, _specs(causal))
    assert keymap.renamed["embed_tokens.weight"] == "model.embed_tokens.weight"
    assert set(keymap.formed) == set(_specs(causal)) - {"lm_head.weight"}
    base = _meta_model("llama", "AutoModel", **MOE)
    keymap = TransformersRules(base).map(_specs(causal), _specs(base))
    assert keymap.unexpected == ("lm_head.weight",) and set(keymap.formed) == set(_specs(base))


def test_a_user_key_mapping_goes_first_and_unmatched_patterns_are_reported():
    model = _meta_model("llama", "AutoModelForCausalLM", **MOE)
    specs = _specs(model)
    renamed = {k.replace("model.layers.", "backbone.blocks."): v for k, v in specs.items()}
    rules = TransformersRules(model, {r"backbone\.blocks\.": "model.layers.", r"^nope": "x"})
    keymap = rules.map(renamed, specs)
    assert set(keymap.formed) == set(specs) and keymap.unmatched_rules == (r"^nope",)


def test_the_conversion_lookup_walks_the_modules_as_torch_walks_them():
    """own_classes hands transformers' lookup the modules already listed: the same pairs in
    the same order as torch's walk, the same transforms found, and nothing left behind."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    from distshard.hfkeys import own_classes
    from distshard.materialize import named_modules

    def found(model):
        return [(type(t).__name__, t.source_patterns, t.target_patterns, t.scope_prefix)
                for t in get_model_conversion_mapping(model)]

    model = _meta_model("mixtral", "AutoModelForCausalLM", **MOE)
    model.model.again = model.model.layers[0]  # one module listed twice, children and all
    walk = torch.nn.Module.named_modules
    want, transforms = list(walk(model)), found(model)
    for listed in (None, named_modules(model)):  # the modules listed here, or by the caller
        with own_classes(model, listed):
            assert "named_modules" in vars(model)
            assert list(model.named_modules()) == want and found(model) == transforms
            assert list(model.named_modules(prefix="p")) == list(walk(model, prefix="p"))
        assert "named_modules" not in vars(model)
    with pytest.raises(KeyError), own_classes(model):
        raise KeyError("the lookup failed")
    assert "named_modules" not in vars(model)

    class OwnWalk(torch.nn.Module):
        def named_modules(self, *args, **kwargs):
            yield "", self

    class Equal(torch.nn.Module):
        def __eq__(self, other):
            return isinstance(other, Equal)

        __hash__ = torch.nn.Module.__hash__

    # modules that walk their own way, or that torch's walk may tell apart otherwise than by
    # identity: torch's walk, as it is
    for odd in (OwnWalk(), Equal(), torch.nn.Linear(1, 1)):
        if type(odd) is torch.nn.Linear:
            odd.named_modules = lambda *args, odd=odd, **kwargs: iter([("", odd)])
        model.model.odd = odd
        with own_classes(model):
            assert "named_modules" not in vars(model)


def _layouts(model) -> dict[str, dict]:
    """Checkpoint layouts of ``model``'s keys: its own, as save_pretrained writes them (the
    transforms reverted), without the base-model prefix, with the norms' legacy names
    (``gamma``, ``beta``), and with a vision tower's keys under ``vision_model`` (an older
    layout that a transform scoped to the tower strips)."""
    from transformers.core_model_loading import revert_weight_conversion

    specs = _specs(model)
    meta = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in specs.items()}
    hub = {k: (tuple(v.shape), v.dtype) for k, v in revert_weight_conversion(model, meta).items()}
    prefix = model.base_model_prefix + "."
    return {"own": specs, "hub": hub,
            "base": {k.removeprefix(prefix): v for k, v in hub.items()},
            "legacy": {re.sub(r"orm\.bias$", "orm.beta", re.sub(r"orm\.weight$", "orm.gamma", k)): v
                       for k, v in hub.items()},
            "nested": {k.replace("vision_tower.", "vision_tower.vision_model."): v
                       for k, v in specs.items()}}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_keys_no_transform_finds_map_as_if_every_transform_were_tried(name):
    """map() tries transformers' transforms only on keys one of their patterns finds; for every
    layout of every zoo architecture, the map equals the one made trying them on every key."""
    model_type, cls, kwargs = ZOO[name]
    model = _meta_model(model_type, cls, **kwargs)
    specs = _specs(model)
    for layout, checkpoint in _layouts(model).items():
        fast = TransformersRules(model)
        slow = TransformersRules(model)
        slow._could_match = lambda: lambda key: True
        try:
            want = slow.map(checkpoint, specs)
        except ValueError as e:  # (a layout these rules refuse: refused alike)
            with pytest.raises(ValueError, match=re.escape(str(e))):
                fast.map(checkpoint, specs)
            continue
        got = fast.map(checkpoint, specs)
        assert got == want, (name, layout)
        assert [t.was_used() for t in fast.transforms] == [t.was_used() for t in slow.transforms]


def test_one_alternation_finds_a_key_where_one_of_the_patterns_does():
    from distshard.patterns import alternation

    patterns = [re.compile(p) for p in (
        r"(?P<g0>LayerNorm.gamma(?!\w))",
        (r"(?P<g0>^model\.language_model\.model(?!\w))|"
         r"(?P<g1>^language_model\.model\.model(?!\w))"),
        r"(?P<g0>mlp\.experts\.\d+\.w[13])$",
        r"(?<=layers\.)(?P<g0>\d+)\.attn")]
    either = alternation(patterns)
    keys = ["model.LayerNorm.gamma", "model.LayerNorm.gammas", "model.language_model.model.x",
            "x.model.language_model.model", "language_model.model.model.y", "mlp.experts.3.w1",
            "mlp.experts.3.w2", "mlp.experts.3.w1.bias", "layers.7.attn.q", "heads.7.attn.q", ""]
    for key in keys:
        assert (either.search(key) is not None) == any(p.search(key) for p in patterns), key
    # where the alternation could find other keys than the patterns do: none is made
    assert alternation([re.compile(r"(?P<g0>a)(?P=g0)"), re.compile("b")]) is None
    assert alternation([re.compile(r"(a)\1"), re.compile("b")]) is None
    assert alternation([re.compile("a", re.IGNORECASE), re.compile("b")]) is None
    assert alternation([re.compile(r"\(?P<g0>a"), re.compile("b")]) is None


def test_a_search_that_cannot_tell_digits_apart_is_asked_once_per_shape_of_key():
    from distshard.patterns import by_digit_shape, digit_blind

    blind = [r"(?P<g0>LayerNorm.gamma(?!\w))", r"(?P<g0>mlp\.experts\.\d+\.w\w)$",
             r"(?<=layers\.)(?P<g10>\d+)\.attn", r"^model\.(?P<g0>.+)"]
    seeing = [r"layers\.1\.", r"experts\.[0-3]\.", r"\d{2}", r"\N{DIGIT ONE}", r"(?P<a>\d)(?P=a)",
              r"(\d)\1", r"\x31", r"\(?P<a1>"]
    assert all(digit_blind(re.compile(p)) for p in blind)
    assert not any(digit_blind(re.compile(p)) for p in seeing)
    keys = [f"model.layers.{i}.mlp.experts.{e}.w{w}" for i in (0, 7, 12, 300) for e in (1, 45)
            for w in (1, 3)] + ["model.layers.3.attn.q", "model.LayerNorm.gamma", "x.y"]
    for p in map(re.compile, blind):
        asked = []

        def found(key, p=p, asked=asked):
            asked.append(key)
            return p.search(key) is not None

        cached = by_digit_shape(found)
        assert [cached(k) for k in keys] == [p.search(k) is not None for k in keys], p
        assert len(asked) == len({k.translate(str.maketrans("123456789", "0" * 9))
                                  for k in keys}) < len(keys)
