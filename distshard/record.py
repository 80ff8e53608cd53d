"""``per_tensor``: the dataclass form of the records a load makes for every tensor; and
``paused_gc``, under which a load makes them.

``TensorInfo``, ``TargetSpec``, ``Part``, ``Slot`` and ``Piece`` are values that nothing
mutates once made, but they are not declared ``frozen=True``: a frozen dataclass sets each field
through ``object.__setattr__``, which makes its construction about 5x slower (2 us against 0.4
for a nine-field slot here), and a load of 100,000 tensors makes several per tensor. They still
compare and hash by value.
"""

import contextlib
import gc
from dataclasses import dataclass

__all__ = ["paused_gc", "per_tensor"]

per_tensor = dataclass(slots=True, unsafe_hash=True)


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
