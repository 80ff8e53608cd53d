"""Test distributed code on a CPU-only machine: N gloo ranks in fresh processes, small sharded
checkpoints written the way users' tools write them, and a user's own torchrun script run with a
deadline.

Ranks in fresh processes
------------------------
::

    from distshard.testing import run_ranks

    def body(rank, world_size, ckpt):          # module level, so the ranks can import it
        ...
        return something_picklable

    results = run_ranks(body, 4, ckpt, timeout=120)   # [rank 0's result, rank 1's, ...]

Rendezvous is a file in a fresh temporary folder (no ports), every rank gets
``OMP_NUM_THREADS=1`` and the caller's environment, and a deadline kills every rank: a hang
fails the test instead of stalling it. Ranks are forked from a server process that imports
torch once, on the first call (a rank starts in a fraction of a second; a spawned one imports
torch again, seconds per rank; what differs is listed in :mod:`distshard.testing.ranks`);
``start_method="spawn"`` starts each as a new interpreter. When ranks fail, :class:`RanksFailed`
carries every failing rank's own traceback, not only a peer's "connection closed".

In pytest: a decorator, and a fixture
-------------------------------------
Enable the plugin in your ``conftest.py`` (it is not registered globally)::

    pytest_plugins = ["distshard.testing"]

A module-level test function decorated with ``@distributed`` runs on every rank; its first two
parameters are the rank and the world size, the others are pytest fixtures, whose values are
pickled to every rank. ``dist_ranks`` runs any module-level function on N ranks and returns
what each returned (deadline: the ini option ``distshard_timeout``, default 120 s). A user's
``test_model.py`` next to their ``train.py``::

    import pytest
    import torch
    import torch.distributed as dist

    import distshard
    from distshard.testing import distributed, run_torchrun, write_checkpoint
    from train import build

    @pytest.fixture
    def checkpoint(tmp_path):
        torch.manual_seed(0)
        model = build()
        torch.save(model.state_dict(), tmp_path / "expected.pt")
        return write_checkpoint(model, tmp_path / "ckpt", max_shard_size="1KB"), tmp_path / "expected.pt"

    @distributed(world_size=2, timeout=60)
    def test_every_rank_gets_the_same_weights(rank, world_size, checkpoint):
        path, expected = checkpoint
        with torch.device("meta"):
            model = build()
        distshard.load(model, path)
        want = torch.load(expected)
        for name, value in model.state_dict().items():
            assert torch.equal(value, want[name]), name

    def world_sum(rank, world_size):
        total = torch.tensor([rank + 1])
        dist.all_reduce(total)
        return total.item()

    def test_ranks_agree(dist_ranks):
        assert dist_ranks(world_sum, 3) == [6, 6, 6]

    def test_train_script_under_torchrun(checkpoint):
        result = run_torchrun("train.py", 2, "--checkpoint", checkpoint[0], timeout=120)
        assert result.stdout == ["rank 0: loaded 4 tensors\\n", "rank 1: loaded 4 tensors\\n"]

Ranks find a decorated test, or a function given to ``dist_ranks``, by its module name,
or from its file where pytest imported it by path (``--import-mode=importlib``). A failing rank
fails the test with its own traceback::

    E   distshard.testing.RanksFailed: 1 of 2 rank(s) failed:
        --- rank 1 ---
        Traceback (most recent call last):
          File "/tmp/demo_user/test_fails.py", line 11, in test_all_reduce_sums
            assert total.item() == 3 + rank  # wrong on rank 1
        AssertionError

Your own torchrun script
------------------------
:func:`run_torchrun` runs ``python -m torch.distributed.run --standalone --nproc-per-node N``
on a script (workers with ``OMP_NUM_THREADS=1``, unbuffered), returns each rank's stdout and
stderr, kills torchrun and every worker at the deadline, and raises :class:`RanksFailed` with
the output of each failing rank. :func:`write_checkpoint` writes the small sharded checkpoint
such a test loads. End such a script with :func:`end_job` (see there why, on gloo).
"""

from __future__ import annotations

from .checkpoints import write_checkpoint
from .decorator import _FunctionRef, distributed  # noqa: F401 (_FunctionRef: for tests)
from .ranks import RanksFailed, run_ranks
from .torchrun import TorchrunResult, end_job, run_torchrun

__all__ = ["RanksFailed", "TorchrunResult", "distributed", "end_job", "run_ranks", "run_torchrun",
           "write_checkpoint"]

# The pytest plugin (``pytest_plugins = ["distshard.testing"]``): its hook and fixture.
try:
    from .decorator import dist_ranks, pytest_addoption  # noqa: F401
except ImportError:  # no pytest: the helpers work without it
    pass
