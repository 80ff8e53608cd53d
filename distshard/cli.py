"""``distshard inspect | plan | verify | reshard``: look at a checkpoint before a job loads it,
or rewrite it with another shard size.

Every command prints for a person, or with ``--json`` one JSON object for a program, and exits
non-zero with the reason when the checkpoint is not valid (status 2 for bad usage, as argparse).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from .errors import DistShardError
from .hf import build_meta_model
from .index import FileInfo, describe_file, find_checkpoint, safe_path
from .keys import key_rules
from .loader import DEFAULT_BUCKET_SIZE
from .materialize import ModelTargets
from .options import LoadOptions
from .plan import make_plan, scaled_bucket_size
from .reshard import reshard
from .shardfiles import parse_size
from .validate import TargetSpec, match_checkpoint

__all__ = ["main"]


def _describe(path: str) -> tuple[object, list[FileInfo]]:
    """Find the checkpoint, read and check every header, and check the index against them
    (every key it names is in the file it names, no key in two files)."""
    ckpt = find_checkpoint(path)
    files = [describe_file(ckpt.root, name, ckpt.kind) for name in ckpt.files]
    specs: dict[str, TargetSpec] = {}
    for f in files:
        for key, t in f.tensors.items():
            specs.setdefault(key, TargetSpec((key,), t.shape, t.dtype))
    match_checkpoint(files, ckpt.weight_map, list(specs.values()), strict=False)
    return ckpt, files


def _summary(ckpt, files: list[FileInfo]) -> dict:
    tensors = [(key, f.name, t) for f in files for key, t in f.tensors.items()]
    largest = max(tensors, key=lambda x: x[2].nbytes, default=None)
    return dict(
        checkpoint=ckpt.root, format=ckpt.kind,
        layout="sharded" if ckpt.weight_map is not None else "single file",
        files=[dict(name=f.name, bytes=f.size, tensors=len(f.tensors)) for f in files],
        tensors=len(tensors),
        dtypes=dict(Counter(str(t.dtype).removeprefix("torch.") for _, _, t in tensors)),
        tensor_bytes=sum(t.nbytes for _, _, t in tensors),
        file_bytes=sum(f.size for f in files),
        largest=None if largest is None else dict(
            key=largest[0], file=largest[1], shape=list(largest[2].shape),
            dtype=str(largest[2].dtype).removeprefix("torch."), bytes=largest[2].nbytes),
        consistent=True)


def _mapping(ckpt, files: list[FileInfo], model_class: str | None) -> tuple[dict, object]:
    """Per model tensor, the checkpoint tensors that form it, for the model the checkpoint's
    ``config.json`` names (or ``model_class``), built on meta; and the match behind it (None
    where there is no model to map onto)."""
    config = os.path.join(ckpt.root, "config.json")
    if model_class == "none" or not os.path.isfile(config):
        return dict(model=None, why="no config.json" if model_class != "none" else "--model none"), None
    try:
        model = _meta_model(ckpt.root, model_class)
    except ImportError:
        return dict(model=None, why="transformers is not installed"), None
    except DistShardError:
        raise
    except Exception as e:  # a config.json transformers does not know (no or another model_type)
        if model_class is not None:
            raise DistShardError(f"cannot build {model_class} from {ckpt.root!r}: "
                                 f"{type(e).__name__}: {e}", file="config.json") from None
        return dict(model=None, why=f"config.json is not a transformers model's config "
                                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"), None
    if model is None:
        return dict(model=None, why="config.json names no architecture (pass --model)"), None
    targets = ModelTargets(model)
    rules = key_rules(model, None)
    match = match_checkpoint(files, ckpt.weight_map, targets.specs(), strict=False, rules=rules,
                             tied=rules.tied_sources())
    keymap = match.keymap
    shapes = {k: t.shape for f in files for k, t in f.tensors.items()}
    operation = {t: c.name for c in keymap.conversions for t in c.targets}
    tensors = {}
    for spec in targets.specs():
        for name in spec.names:
            sources = list(keymap.sources_of(name)) or (
                list(keymap.sources_of(match.aliases[name])) if name in (match.aliases or {}) else [])
            if not sources:
                continue
            parts = keymap.parts.get(name, ())
            whole = len(parts) == 1 and parts[0].source_box[1] == tuple(shapes[sources[0]])
            kind = ("conversion" if name in operation
                    else "tied" if name in (match.aliases or {})
                    else "same" if whole and sources == [name]
                    else "renamed" if whole else "slice" if len(parts) == 1 else "boxes")
            tensors[name] = dict(kind=kind, sources=sources)
            if name in operation:
                tensors[name]["operation"] = operation[name]
    return dict(model=type(model).__name__, tensors=tensors, missing=list(match.missing_keys),
                unexpected=list(match.unexpected_keys)), match


def _meta_model(root: str, model_class: str | None):
    """The model ``from_pretrained`` would build (on meta) for the class named, or the one
    ``config.json`` names; None where it names none."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(root, local_files_only=True)
    name = model_class or (getattr(config, "architectures", None) or [None])[0]
    if name is None:
        return None
    cls = getattr(transformers, name, None)
    if cls is None:
        raise DistShardError(f"no transformers model class {name!r} for {root!r}; pass --model "
                             "with a class name (LlamaForCausalLM, AutoModel, ...) or none",
                             file="config.json")
    return build_meta_model(cls, root)


def _inspect(args) -> dict:
    ckpt, files = _describe(args.checkpoint)
    return dict(_summary(ckpt, files), mapping=_mapping(ckpt, files, args.model)[0])


def _plan(args) -> dict:
    ckpt, files = _describe(args.checkpoint)
    mapping, match = _mapping(ckpt, files, args.model)
    per_node_ranks = args.world_size // args.nodes
    groups = [range(n * per_node_ranks, (n + 1) * per_node_ranks) for n in range(args.nodes)]
    if match is not None:  # as the load reads: the tensors the model uses, as it forms them
        files = list(match.files)
    # as a replicated load over gloo plans (its nodes' images cross nodes in smaller buckets)
    options = LoadOptions(bucket_size=args.bucket_size, locality=args.locality)
    plan = make_plan(files, args.world_size, options.bucket_size_for(args.nodes, True),
                     groups if args.locality == "node" else None,
                     parts=match.parts if match else None,
                     conversions=match.conversions if match else (),
                     outputs=match.outputs if match else None)
    per_rank = plan.bytes_per_rank()
    per_node = [sum(per_rank[r] for r in g) for g in groups]
    total = sum(t.nbytes for f in files for t in f.tensors.values())
    mean = sum(per_rank) / args.world_size if args.world_size else 0
    return dict(
        checkpoint=ckpt.root, world_size=args.world_size, nodes=args.nodes,
        locality=args.locality,
        bucket_bytes=plan.bucket_size, buckets=len(plan.buckets),
        ranks=[dict(rank=r, node=r // per_node_ranks, read_bytes=b,
                    buckets=sum(1 for k in plan.buckets if k.owner == r),
                    files=sorted({k.file for k in plan.buckets if k.owner == r}))
               for r, b in enumerate(per_rank)],
        node_read_bytes=per_node, total_bytes=total, job_read_bytes=sum(per_rank),
        balance=max(per_rank) / mean if mean else 1.0,
        replicated=dict(holds_per_node=total, holds_per_rank=total,
                        staging_per_rank=plan.bucket_size),
        sharded=dict(holds_per_rank=-(-total // args.world_size),
                     staging_per_rank=2 * scaled_bucket_size(
                         args.bucket_size, total, per_node_ranks if args.locality == "node"
                         else args.world_size)),
        mapping=mapping)


def _sha256(root: str, name: str) -> str:
    h = hashlib.sha256()
    try:
        with open(safe_path(root, name), "rb", buffering=0) as f:
            buf = bytearray(8 << 20)
            view = memoryview(buf)
            while n := f.readinto(buf):
                h.update(view[:n])  # hashlib releases the GIL on large updates: threads overlap
    except OSError as e:  # removed or unreadable since it was described
        raise DistShardError(f"cannot hash {name!r}: {e}", file=name) from e
    return h.hexdigest()


def _verify(args) -> dict:
    ckpt, files = _describe(args.checkpoint)
    out = _summary(ckpt, files)
    if args.hash:
        names = [f.name for f in files]
        with ThreadPoolExecutor(max_workers=min(8, len(names) or 1)) as pool:
            digests = pool.map(lambda name: _sha256(ckpt.root, name), names)
            for entry, digest in zip(out["files"], digests):
                entry["sha256"] = digest
    return out


def _reshard(args) -> dict:
    ckpt, files = _describe(args.checkpoint)
    return reshard(ckpt, files, args.out, args.max_shard_size)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _print_summary(d: dict, verified: bool) -> None:
    print(f"checkpoint  {d['checkpoint']}")
    print(f"format      {d['format']}, {d['layout']}, {len(d['files'])} file(s), "
          f"{_gb(d['file_bytes'])} on disk")
    dtypes = ", ".join(f"{k} {v}" for k, v in sorted(d["dtypes"].items()))
    print(f"tensors     {d['tensors']} ({dtypes}), {_gb(d['tensor_bytes'])}")
    if d["largest"]:
        g = d["largest"]
        print(f"largest     {g['key']} {g['shape']} {g['dtype']}, {_gb(g['bytes'])} in {g['file']}")
    print("consistent  " + ("the index and every file header agree" if d["layout"] == "sharded"
                            else "the file's header is valid"))
    if verified:
        for f in d["files"]:
            digest = f"  sha256 {f['sha256']}" if "sha256" in f else ""
            print(f"  ok  {f['name']}  {_gb(f['bytes'])}, {f['tensors']} tensors{digest}")


def _print_mapping(m: dict) -> None:
    """The model tensors not read 1:1 under their own name: renamed, formed of several
    checkpoint tensors (boxes), made by a conversion, or read from a tied key."""
    if m["model"] is None:
        print(f"mapping     none ({m['why']})")
        return
    kinds = Counter(e["kind"] for e in m["tensors"].values())
    print(f"mapping     onto {m['model']}: {len(m['tensors'])} model tensors from the "
          f"checkpoint ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}); "
          f"{len(m['missing'])} missing, {len(m['unexpected'])} unused")
    shown = [(k, e) for k, e in m["tensors"].items() if e["kind"] != "same"]
    for key, e in shown[:MAPPING_LINES]:
        sources = e["sources"]
        text = ", ".join(sources[:2]) + (f", ... ({len(sources)} tensors)" if len(sources) > 2 else "")
        how = e.get("operation", e["kind"])
        print(f"  {key} <- {text}  [{how}]")
    if len(shown) > MAPPING_LINES:
        print(f"  ... {len(shown) - MAPPING_LINES} more (--json lists every tensor)")
    for label in ("missing", "unexpected"):
        if m[label]:
            print(f"  {label}: {', '.join(m[label][:8])}" + (" ..." if len(m[label]) > 8 else ""))


MAPPING_LINES = 12


def _print_plan(d: dict) -> None:
    once = "once per job" if d["locality"] == "cluster" else "once per node"
    print(f"plan for {d['world_size']} rank(s) on {d['nodes']} node(s): {d['buckets']} buckets "
          f"of up to {_gb(d['bucket_bytes'])}, each byte read {once} "
          f"({_gb(d['job_read_bytes'])} in all)")
    print(f"{'rank':>4} {'node':>4} {'reads':>10} {'buckets':>7}  files")
    for r in d["ranks"]:
        print(f"{r['rank']:>4} {r['node']:>4} {_gb(r['read_bytes']):>10} {r['buckets']:>7}  "
              f"{', '.join(r['files'])}")
    print("per node    " + ", ".join(f"node {n}: {_gb(b)}" for n, b in enumerate(d["node_read_bytes"])))
    print(f"balance     heaviest rank reads {d['balance']:.2f} x the mean")
    print(f"replicated  each node holds {_gb(d['replicated']['holds_per_node'])} in /dev/shm, "
          f"its ranks' tensors copy-on-write views of it (gloo/CPU; else each rank "
          f"{_gb(d['replicated']['holds_per_rank'])}), + at most "
          f"{_gb(d['replicated']['staging_per_rank'])} staging")
    print(f"sharded     each rank holds about {_gb(d['sharded']['holds_per_rank'])} "
          f"+ at most {_gb(d['sharded']['staging_per_rank'])} staging")
    _print_mapping(d["mapping"])


def _print_reshard(d: dict) -> None:
    print(f"resharded   {d['checkpoint']} ({d['format']}, {d['source_files']} file(s)) -> {d['out']}")
    for f in d["files"]:
        print(f"  wrote  {f['name']}  {_gb(f['bytes'])}, {f['tensors']} tensors")
    if d["index"]:
        print(f"  wrote  {d['index']}")
    print(f"total       {d['tensors']} tensors, {_gb(d['tensor_bytes'])} in {len(d['files'])} "
          f"file(s) of at most {_gb(d['max_shard_size'])} of tensors each (a larger tensor "
          "gets a file of its own)")
    print("copied      " + (", ".join(d["copied"]) or "nothing else"))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def _shard_size(text: str) -> str:
    try:
        parse_size(int(text) if text.isdigit() else text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return int(text) if text.isdigit() else text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distshard",
        description="Look at a checkpoint before a job loads it, or rewrite it with another "
                    "shard size. Every command prints for a person, or with --json one JSON "
                    "object; it exits non-zero with the reason when the checkpoint is not valid.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("inspect", "format, files, tensors, dtypes, sizes; checks the index"),
                       ("plan", "who reads what with N ranks on M nodes"),
                       ("verify", "check every header and the index; --hash adds sha256")):
        c = sub.add_parser(name, help=text, description=text)
        c.add_argument("checkpoint", help="checkpoint folder or file")
        c.add_argument("--json", action="store_true", help="print one JSON object")
        if name in ("inspect", "plan"):
            c.add_argument("--model", help="transformers class to map the keys onto (default: "
                           "the architecture in config.json; 'none': no mapping)")
        if name == "plan":
            c.add_argument("--world-size", type=_positive, required=True)
            c.add_argument("--nodes", type=_positive, default=1)
            c.add_argument("--bucket-size", type=_positive, default=DEFAULT_BUCKET_SIZE,
                           help="bytes (default %(default)s)")
            c.add_argument("--locality", choices=["cluster", "node"], default="cluster",
                           help="read each byte once per job, or once per node")
        if name == "verify":
            c.add_argument("--hash", action="store_true", help="sha256 of every file, in parallel")
    text = "rewrite as safetensors files of another size, streamed, into a new folder"
    c = sub.add_parser("reshard", help=text, description=text)
    c.add_argument("checkpoint", help="checkpoint folder or file (safetensors or .bin)")
    c.add_argument("out", help="new or empty folder for the result")
    c.add_argument("--max-shard-size", type=_shard_size, default="5GB",
                   help="tensor bytes per file: 200MB, 5GB, 1GiB or bytes (default %(default)s)")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "plan" and args.world_size % args.nodes:
        parser.error(f"--world-size ({args.world_size}) must be a multiple of --nodes "
                     f"({args.nodes})")
    run = {"inspect": _inspect, "plan": _plan, "verify": _verify,
           "reshard": _reshard}[args.command]
    try:
        result = run(args)
    except DistShardError as e:
        if args.json:
            print(json.dumps(dict(valid=False, error=str(e), file=e.file, key=e.key)))
        else:
            why = "failed" if args.command == "reshard" else "invalid checkpoint"
            print(f"distshard {args.command}: {why}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(dict(result, valid=True), indent=1))
    elif args.command == "plan":
        _print_plan(result)
    elif args.command == "reshard":
        _print_reshard(result)
    else:
        _print_summary(result, verified=args.command == "verify")
        if "mapping" in result:
            _print_mapping(result["mapping"])
    return 0
