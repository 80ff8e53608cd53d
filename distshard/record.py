"""``per_tensor``: the dataclass form of the records a load makes for every tensor; and
``paused_gc``, under which a load makes them.

``TensorInfo``, ``TargetSpec``, ``Part``, ``Slot`` and ``Piece`` (and the records of a save)
are values that nothing mutates once made, but they are not declared ``frozen=True``: a frozen
dataclass sets each field through ``object.__setattr__``, which makes its construction about 5x
slower (2 us against 0.4 for a nine-field slot here), and a load of 100,000 tensors makes several
per tensor. They still compare and hash by value. They pickle as their class and the tuple of
their fields (a slot class otherwise pickles a dict of its slots per record: a save plan of
100,000 tensors unpickled in 0.76 s against about 0.4 s so).
"""

import contextlib
import gc
from dataclasses import dataclass, fields
from operator import attrgetter

__all__ = ["paused_gc", "per_tensor"]


def per_tensor(cls: type) -> type:
    """``cls`` as a slot dataclass that compares and hashes by value and pickles by fields."""
    made = dataclass(slots=True, unsafe_hash=True)(cls)
    names = [f.name for f in fields(made)]
    get = attrgetter(*names)
    if len(names) == 1:
        made.__reduce__ = lambda self: (made, (get(self),))
    else:
        made.__reduce__ = lambda self: (made, get(self))
    return made


@contextlib.contextmanager
def paused_gc():
    """No cyclic garbage collection inside (as it was again after): a load makes several objects
    per tensor, and each full collection walks every object the process holds (a model of
    100,000 tensors holds millions), so collections triggered by those objects alone cost about
    30 us per tensor here. Nothing made inside depends on being collected early."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
