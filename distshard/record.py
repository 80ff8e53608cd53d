"""``per_tensor``: the dataclass form of the records a load makes for every tensor.

``TensorInfo``, ``TargetSpec``, ``Part``, ``Slot`` and ``Piece`` are values that nothing
mutates once made, but they are not declared ``frozen=True``: a frozen dataclass sets each field
through ``object.__setattr__``, which makes its construction about 5x slower (2 us against 0.4
for a nine-field slot here), and a load of 100,000 tensors makes several per tensor. They still
compare and hash by value.
"""

from dataclasses import dataclass

__all__ = ["per_tensor"]

per_tensor = dataclass(slots=True, unsafe_hash=True)
