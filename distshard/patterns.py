"""Which checkpoint keys transformers' transforms could rename, asked cheaply.

:meth:`distshard.hfkeys.TransformersRules.map` gives a key to transformers'
``rename_source_key`` with every transform only where one of their patterns is found in it
(most keys: none is, and only the base-model prefix step applies). On a checkpoint of 100,000
tensors that pre-check runs 100,000 times, so it is made cheap without being made different:
the patterns are searched as one alternation where that finds exactly what they find, and once
per shape of key (digits made ``0``) where no pattern can tell one digit from another. Both
facts are read off the patterns' text; where the text does not say, the patterns are searched
as they are.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence

__all__ = ["alternation", "by_digit_shape", "could_match", "digit_blind"]


def could_match(transforms: Sequence) -> Callable[[str], bool]:
    """A test that is False for a key no transform of ``transforms`` (transformers'
    ``WeightRenaming`` and ``WeightConverter``) can rename: each would return it unchanged,
    with no pattern. The test is each transform's own compiled patterns, searched in the key;
    a transform scoped to a sub-model may match whenever the key holds its scope (with or
    without the base-model prefix before it)."""
    patterns, scopes = [], []
    for t in transforms:
        if t.scope_prefix is None:
            patterns.append(t.compiled_sources)
        else:
            scopes.append(f"{t.scope_prefix}." if t.scope_prefix else "")
    either = alternation(patterns)
    searches = [p.search for p in patterns] if either is None else [either.search]

    def found(key: str) -> bool:
        for search in searches:
            if search(key) is not None:
                return True
        return False

    if all(digit_blind(p) for p in patterns):  # one search per shape of key
        found = by_digit_shape(found)
    if not scopes:
        return found

    def test(key: str) -> bool:
        if found(key):
            return True
        for scope in scopes:
            if scope in key:
                return True
        return False
    return test


_NAMED_GROUP = re.compile(r"\(\?P<\w+>")


def alternation(patterns: list[re.Pattern]) -> re.Pattern | None:
    """One pattern that a key's search finds exactly where one of ``patterns``' does: their
    alternation, each group's name dropped (transformers names them ``g0``, ``g1``... in every
    pattern). None where that is not sure to hold: mixed flags, or a pattern that refers back
    to a group (by name or number) or names a group in a way this does not read."""
    if len(patterns) < 2 or len({p.flags for p in patterns}) != 1:
        return None
    parts = []
    for p in patterns:
        source = _unnamed(p)
        if source is None:
            return None
        parts.append(f"(?:{source})")
    try:
        with warnings.catch_warnings():  # (a flag placed mid-pattern only warns before 3.11)
            warnings.simplefilter("error")
            return re.compile("|".join(parts), patterns[0].flags)
    except (re.error, Warning):
        return None


def _unnamed(pattern: re.Pattern) -> str | None:
    """The pattern's text with each named group made a plain one; None where the text is not
    read so surely: a pattern that refers back to a group (by name or number), a conditional,
    an escaped paren (``\\(?P<a>`` is no group), or a named group this does not read."""
    source = pattern.pattern
    if not isinstance(source, str) or "(?P=" in source or "(?(" in source or re.search(
            r"\\[1-9]", source) or len(_NAMED_GROUP.findall(source)) != len(pattern.groupindex) \
            or "\\(" in source:
        return None
    return _NAMED_GROUP.sub("(?:", source)


def digit_blind(pattern: re.Pattern) -> bool:
    """Whether ``pattern`` cannot tell one ASCII digit from another, so that it is found in a
    key exactly where it is found in the key with every digit made ``0``: read off its text,
    which names no digit (group names aside), no character class, no character by name, and no
    group to match again (these are where a pattern can tell digits apart; ``\\d``, ``\\w``,
    ``.`` and the like cannot). Where the text does not say, False."""
    source = _unnamed(pattern)
    return source is not None and not any(c in source for c in "0123456789[") \
        and "\\N" not in source


# (on the key's UTF-8 bytes: str.translate costs more than the search it would save; no byte of
# a character outside ASCII is an ASCII digit)
_ZEROS = bytes.maketrans(b"123456789", b"000000000")


def by_digit_shape(found: Callable[[str], bool]) -> Callable[[str], bool]:
    """``found``, asked once per shape of key (its digits made ``0``): a checkpoint's keys
    repeat a few shapes over layers and experts. Only for tests that cannot tell one digit
    from another (:func:`digit_blind`)."""
    seen: dict[bytes, bool] = {}

    def cached(key: str) -> bool:
        shape = key.encode("utf-8", "surrogatepass").translate(_ZEROS)
        hit = seen.get(shape)
        if hit is None:
            hit = seen[shape] = found(key)
        return hit
    return cached
