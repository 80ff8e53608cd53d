"""``@distributed`` and the ``dist_ranks`` fixture: module-level test functions run on ranks in
fresh processes (see :mod:`distshard.testing`)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .ranks import DEFAULT_TIMEOUT, run_ranks

__all__ = ["distributed"]


@dataclass(frozen=True, slots=True)
class _FunctionRef:
    """How a rank finds a module-level function: by module, name and file, rather than
    by pickling it. A decorated test's name is bound to its runner, so pickle would hand the
    rank the runner (which would spawn again); and a module that pytest imported from its path
    (``--import-mode=importlib``) is not importable by name in a rank's process."""

    module: str
    qualname: str
    file: str | None

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> Callable[..., Any]:
        """A reference to ``fn`` when it is a module-level function; else ``fn`` itself."""
        if not inspect.isfunction(fn) or "." in fn.__qualname__:
            return fn
        return cls(fn.__module__, fn.__qualname__, inspect.getsourcefile(fn))

    def __call__(self, rank: int, world_size: int, *args: Any) -> Any:
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            if self.file is None:
                raise
            spec = importlib.util.spec_from_file_location(self.module, self.file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[self.module] = module
            spec.loader.exec_module(module)
        fn = getattr(module, self.qualname)
        return getattr(fn, "__distshard_body__", fn)(rank, world_size, *args)


def distributed(world_size: int = 2, *, timeout: float = DEFAULT_TIMEOUT, backend: str = "gloo",
                env: dict[str, str] | None = None, start_method: str | None = None
                ) -> Callable[[Callable[..., Any]], Callable[..., None]]:
    """Run the decorated module-level test function on ``world_size`` ranks (``backend``,
    ``env`` and ``start_method`` as for :func:`~distshard.testing.run_ranks`).

    The function takes ``(rank, world_size, *fixtures)``; pytest sees only the fixtures, and
    their values are sent to every rank. The test fails with :class:`RanksFailed` (every
    failing rank's traceback) when a rank raises or the ranks miss ``timeout`` seconds.
    """
    def decorate(fn: Callable[..., Any]) -> Callable[..., None]:
        if not inspect.isfunction(fn) or "." in fn.__qualname__:
            raise TypeError(f"@distributed needs a module-level function, which the ranks can "
                            f"import by name; {getattr(fn, '__qualname__', fn)!r} is not one")
        params = list(inspect.signature(fn).parameters.values())
        if len(params) < 2 or any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                                  for p in params):
            raise TypeError(f"@distributed: {fn.__qualname__} must take (rank, world_size, "
                            "*fixtures) as plain positional parameters")
        visible = inspect.Signature(params[2:])
        ref = _FunctionRef.of(fn)

        @functools.wraps(fn)
        def runner(*args: Any, **kwargs: Any) -> None:
            __tracebackhide__ = True
            bound = visible.bind(*args, **kwargs)
            run_ranks(ref, world_size, *bound.args, timeout=timeout, backend=backend, env=env,
                      start_method=start_method)

        runner.__signature__ = visible  # what pytest reads for fixtures
        runner.__distshard_body__ = fn
        return runner
    return decorate


try:
    import pytest
except ImportError:  # the helpers above work without pytest
    pytest = None

if pytest is not None:
    def pytest_addoption(parser) -> None:
        parser.addini("distshard_timeout", "deadline in seconds of the dist_ranks fixture",
                      default=str(DEFAULT_TIMEOUT))

    @pytest.fixture
    def dist_ranks(request) -> Callable[..., list[Any]]:
        """``dist_ranks(fn, world_size, *args, timeout=None, **options)``: :func:`run_ranks`
        (``options``: its ``backend``, ``env``, ``start_method``) with the deadline from the ini
        option ``distshard_timeout`` unless given."""
        try:
            default = float(request.config.getini("distshard_timeout"))
        except ValueError:  # the fixture was imported without the plugin's ini option
            default = DEFAULT_TIMEOUT

        def run(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float | None = None,
                **kwargs: Any) -> list[Any]:
            __tracebackhide__ = True
            return run_ranks(_FunctionRef.of(fn), world_size, *args, timeout=timeout or default,
                             **kwargs)
        return run
