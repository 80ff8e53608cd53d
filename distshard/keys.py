"""The keys of a load: which rules map a checkpoint onto a model, the match rank 0 makes with
them (and which new weights the load will initialise), how a conversion of whole checkpoint
tensors runs on the rank that read them, and the log of what was new or unused. No
collectives here: :mod:`distshard.loader` calls these on the ranks it says.
"""

from __future__ import annotations

import logging
import threading

import torch

from .hfkeys import TransformersRules, is_transformers_model
from .index import describe_file, find_checkpoint
from .initialize import Initializer, initializable
from .keymap import RegexRules
from .materialize import ModelTargets
from .record import paused_gc
from .report import LoadReport
from .validate import Match, match_checkpoint, refuse_quantized, refuse_unmatched

__all__ = ["converter", "key_rules", "log_keys", "match_model"]

logger = logging.getLogger("distshard")


def key_rules(model: torch.nn.Module, key_mapping: dict[str, str] | None,
              modules: list | None = None):
    """The rules that map a checkpoint's keys onto ``model``: transformers' own for a
    transformers model, else ``key_mapping`` alone. ``modules``: the model's ``(name, module)``
    pairs, if the caller has them (see :class:`ModelTargets`)."""
    if is_transformers_model(model):
        with paused_gc():  # (a walk of every module: see paused_gc)
            return TransformersRules(model, key_mapping, modules=modules)
    return RegexRules(key_mapping)


def match_model(checkpoint, model: torch.nn.Module, targets: ModelTargets, rules,
                strict: bool) -> tuple[str, Match, list[str]]:
    """Rank 0: find the checkpoint, refuse a quantized one, read every header and match it
    with the model through ``rules``; return its folder, the match, and one name per tensor
    group that the load will initialise (missing, and initialisable: see
    :mod:`distshard.initialize`)."""
    ckpt = find_checkpoint(checkpoint)
    refuse_quantized(ckpt.root, model)
    with paused_gc():
        files = [describe_file(ckpt.root, name, ckpt.kind) for name in ckpt.files]
        specs = targets.specs()
        match = match_checkpoint(files, ckpt.weight_map, specs, strict=False, rules=rules,
                                 tied=rules.tied_sources())
    missing = set(match.missing_keys)
    # which missing tensor groups the model can initialise (of a group, every name is missing
    # or none is; asked of those groups only: the answer for one does not depend on the others)
    can = frozenset()
    if missing:
        can = initializable(targets, [t.names[0] for t in specs if t.names[0] in missing],
                            Initializer(model))
    if strict:
        refuse_unmatched(match, can)
    for names in match.tied_copies:
        logger.warning(
            "distshard: the checkpoint holds %s as separate tensors, but the model ties them: "
            "%r is loaded into all of them (transformers leaves such weights untied when the "
            "copies differ; untie them in the model, or drop the extra copies, if they do)",
            " and ".join(map(repr, names)), names[0])
    hf = is_transformers_model(model)
    initialized = [t.names[0] for t in specs
                   if set(t.names) <= missing and t.names[0] in can
                   and (hf or targets.by_name[t.names[0]].tensor.device.type == "meta")
                   ] if missing else []
    return ckpt.root, match, initialized


def converter(rules, targets: ModelTargets):
    """Runs a conversion as transformers does: floating sources cast to the dtype of the first
    model tensor it makes, then the operation, then each result in its tensor's dtype.
    ``rules``: the rules, or a function that makes them, called once, on the first conversion
    (building transformers' mapping costs a rank time that a load without one need not pay)."""
    made_rules = []
    lock = threading.Lock()

    def rules_now():
        with lock:  # reader threads convert side by side
            if not made_rules:
                made_rules.append(rules() if callable(rules) else rules)
            return made_rules[0]

    def convert(conversion, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = targets.target_dtype(targets.by_name[conversion.targets[0]].tensor)
        cast = {k: v.to(dtype) if v.is_floating_point() and dtype.is_floating_point else v
                for k, v in tensors.items()}
        made = rules_now().convert(conversion, cast)
        for alias, source in conversion.aliases:
            made[alias] = made[source]
        return {k: v.to(targets.target_dtype(targets.by_name[k].tensor))
                for k, v in made.items() if k in targets.by_name}
    return convert


def log_keys(report: LoadReport, model_name: str, root: str) -> None:
    """As transformers reports a load: new weights as a warning, unused checkpoint keys."""
    if report.initialized_keys:
        logger.warning(
            "distshard: some weights of %s were not in the checkpoint at %s and are newly "
            "initialized (the same on every rank): %s; you should probably train this model on "
            "a down-stream task before using it", model_name, root, report.initialized_keys)
    if report.unexpected_keys:
        logger.info("distshard: %d checkpoint tensor(s) at %s are not used by %s and were not "
                    "read: %s", len(report.unexpected_keys), root, model_name,
                    report.unexpected_keys)
