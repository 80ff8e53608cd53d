"""The one exception type users catch, and the per-rank failure record it carries."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DistShardError", "RankFailure"]


@dataclass(frozen=True, slots=True)
class RankFailure:
    """What went wrong on one rank: picklable, so it can travel to every other rank."""

    rank: int
    phase: str
    message: str
    file: str | None = None
    key: str | None = None
    traceback: str | None = None

    def describe(self) -> str:
        where = [f"rank {self.rank}", self.phase]
        if self.file is not None:
            where.append(f"file {self.file!r}")
        if self.key is not None:
            where.append(f"key {self.key!r}")
        return f"[{', '.join(where)}] {self.message}"


class DistShardError(RuntimeError):
    """A load or save failed. Raised on every rank of the group with the same message.

    ``failures`` holds one :class:`RankFailure` per rank that failed, sorted by rank; ``file``
    and ``key`` are those of the first failure that names one. The model was not changed.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        key: str | None = None,
        failures: tuple[RankFailure, ...] = (),
    ) -> None:
        super().__init__(message)
        self.file = file
        self.key = key
        self.failures = failures

    @classmethod
    def from_failures(cls, failures: list[RankFailure] | tuple[RankFailure, ...],
                      action: str = "load") -> DistShardError:
        ordered = tuple(sorted(failures, key=lambda f: (f.rank, f.phase)))
        ranks = ", ".join(str(f.rank) for f in ordered)
        lines = [f"distshard: {action} failed on rank(s) {ranks}:"]
        lines += [f"  {f.describe()}" for f in ordered]
        first_file = next((f.file for f in ordered if f.file is not None), None)
        first_key = next((f.key for f in ordered if f.key is not None), None)
        return cls("\n".join(lines), file=first_file, key=first_key, failures=ordered)

    def __reduce__(self):  # keep keyword attributes across pickling (spawned test ranks)
        return (_rebuild, (str(self), self.file, self.key, self.failures))


def _rebuild(message, file, key, failures) -> DistShardError:
    return DistShardError(message, file=file, key=key, failures=failures)
