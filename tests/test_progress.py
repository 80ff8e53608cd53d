"""The job-wide progress bar (distshard.progress) and the report's summary line: counting through
the store across ranks (in-process stores with reader threads, and the process group's own store
on spawned ranks), the drawn line on a fake terminal, when it stays off, and summary()."""

from __future__ import annotations

import io
import logging
import threading

import pytest
import torch.distributed as dist

from distshard.progress import JobProgress, ProgressHandler, logger
from distshard.report import LoadReport
from distshard.testing import run_ranks

DEADLINE = 120.0


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Records(logging.Handler):
    """Keeps the records of ``distshard.progress``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def progress_log():
    """Swap the progress logger's handlers for a recorder (the default handler is installed
    only on a logger without one, so none is added behind the test's back)."""
    saved = logger.handlers[:], logger.level, logger.propagate
    recorder = Records()
    logger.handlers[:] = [recorder]
    logger.setLevel(logging.INFO)
    yield recorder
    logger.handlers[:], _, logger.propagate = saved
    logger.setLevel(saved[1])


@pytest.fixture
def quiet_threads(monkeypatch):
    """Flusher threads that never wake on their own: the test decides when to sync and draw."""
    monkeypatch.setattr(JobProgress, "poll_interval", 3600.0)
    monkeypatch.setattr(JobProgress, "push_interval", 3600.0)


def _read_in_threads(progress: JobProgress, chunks: list[int], threads: int = 3) -> None:
    """Reader threads calling advance() concurrently, as the loader's readers do."""
    parts = [chunks[i::threads] for i in range(threads)]
    workers = [threading.Thread(target=lambda p=p: [progress.advance(n) for n in p]) for p in parts]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


# --- counting ---------------------------------------------------------------------------------

@pytest.mark.parametrize("store_kind", ["hash", "tcp"])
def test_three_ranks_count_to_the_job_total_through_one_store(store_kind, progress_log):
    if store_kind == "hash":
        stores = [dist.HashStore()] * 3
    else:  # the server on an ephemeral port, each rank its own client, as in a real job
        server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        stores = [server] + [dist.TCPStore("127.0.0.1", server.port, is_master=False)
                             for _ in range(2)]
    chunks = {0: [4096] * 50, 1: [1000, 7] * 40, 2: [123457] * 9}  # uneven on purpose
    total = sum(sum(c) for c in chunks.values())
    ranks = [JobProgress(total, rank=r, key=f"job-{store_kind}", store=stores[r], enabled=True)
             for r in range(3)]
    rank_threads = [threading.Thread(target=_read_in_threads, args=(ranks[r], chunks[r]))
                    for r in range(3)]
    for t in rank_threads:
        t.start()
    for t in rank_threads:
        t.join()
    for p in ranks[1:]:
        p.flush()
    for p in ranks:
        p.close()
    assert ranks[0].done_bytes == total
    assert [p.done_bytes for p in ranks[1:]] == [sum(chunks[1]), sum(chunks[2])]
    final = [r for r in progress_log.records if r.distshard_progress == "final"]
    assert len(final) == 1 and final[0].getMessage().startswith(
        f"distshard: {total / 1e6:.2f} MB / {total / 1e6:.2f} MB (100%)")


def _count_on_ranks(rank: int, world_size: int, total: int) -> tuple[int, list[str]]:
    recorder = Records()
    logger.handlers[:] = [recorder]
    logger.setLevel(logging.INFO)
    store = dist.distributed_c10d._get_default_store()
    share = [total // world_size // 10] * 10
    with JobProgress(total, rank=rank, key="spawned", store=store, enabled=True) as progress:
        _read_in_threads(progress, share, threads=2)
        progress.flush()
        dist.barrier()  # every rank's bytes are in the store before rank 0 closes
    return progress.done_bytes, [r.getMessage() for r in recorder.records]


@pytest.mark.multiprocess
def test_ranks_of_a_process_group_count_through_its_store_and_only_rank_0_draws():
    total = 3 * 10 * 70_000
    results = run_ranks(_count_on_ranks, 3, total, timeout=DEADLINE)
    (job, lines0), *others = results
    assert job == total
    assert lines0[-1].startswith("distshard: 2.10 MB / 2.10 MB (100%)")
    assert others == [(total // 3, []), (total // 3, [])]  # they count their own, draw nothing


# --- drawing ------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rank_0_redraws_one_line_on_a_terminal_and_ends_it(monkeypatch, quiet_threads):
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.delenv("DISTSHARD_PROGRESS", raising=False)
    clock = Clock()
    monkeypatch.setattr(JobProgress, "clock", staticmethod(clock))
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers[:] = [ProgressHandler()]  # the default handler, writing to sys.stderr
    logger.setLevel(logging.INFO)
    try:
        progress = JobProgress(4 * 10**9, rank=0, key="draw", enabled=None)
        assert progress.drawing
        for seconds, step in [(2.0, 10**9), (4.0, 2 * 10**9)]:
            progress.advance(step)
            clock.now += seconds
            progress._sync(wait=True)
            progress._draw(final=False)
        progress.advance(10**9)
        clock.now += 1.0
        progress.close()
        progress.close()  # idempotent: no second final line
    finally:
        logger.handlers[:], _, logger.propagate = saved
        logger.setLevel(saved[1])
    out = terminal.getvalue()
    first = "distshard: 1.00 GB / 4.00 GB (25%) | 0.50 GB/s | ETA 0:06"
    second = "distshard: 3.00 GB / 4.00 GB (75%) | 0.50 GB/s | ETA 0:02"
    final = "distshard: 4.00 GB / 4.00 GB (100%) | 0.57 GB/s | done in 7.0 s"
    assert out == f"\r{first}\r{second}\r{final}" + " " * (len(second) - len(final)) + "\n"
    assert out.count("\n") == 1  # redrawn in place, one line in the end


def test_a_plain_stream_gets_whole_lines_not_redraws():
    stream = io.StringIO()
    handler = ProgressHandler(stream)
    handler.plain_interval = 3600.0

    def record(text: str, kind: str) -> logging.LogRecord:
        r = logging.LogRecord("distshard.progress", logging.INFO, __file__, 1, text, None, None)
        r.distshard_progress = kind
        return r

    for text, kind in [("a", "update"), ("b", "update"), ("c", "final")]:
        handler.handle(record(text, kind))
    assert stream.getvalue() == "a\nc\n"  # the first update, then none within the interval


# --- off --------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank,tty,env,enabled,draws", [
    (0, True, None, None, True),
    (0, False, None, None, False),   # not a terminal
    (0, True, "0", None, False),     # DISTSHARD_PROGRESS=0
    (1, True, None, None, False),    # other ranks never draw
    (2, True, None, True, False),
    (0, False, None, True, True),    # forced on
    (0, True, None, False, False),   # forced off
])
def test_when_the_bar_is_drawn(monkeypatch, progress_log, quiet_threads, rank, tty, env, enabled,
                               draws):
    monkeypatch.setattr("sys.stderr", FakeTerminal() if tty else io.StringIO())
    if env is None:
        monkeypatch.delenv("DISTSHARD_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("DISTSHARD_PROGRESS", env)
    with JobProgress(1000, rank=rank, key="off", enabled=enabled) as progress:
        progress.advance(1000)
    assert progress.drawing is draws
    assert bool(progress_log.records) is draws
    assert "distshard" not in __import__("sys").stderr.getvalue()  # nothing but through logging


def test_off_means_no_thread_and_no_store_traffic(monkeypatch):
    class Store:
        calls = 0

        def add(self, key, n):
            Store.calls += 1
            return n

    monkeypatch.setenv("DISTSHARD_PROGRESS", "0")
    for rank, enabled in [(1, None), (1, False), (0, False)]:
        with JobProgress(10, rank=rank, key="off", store=Store(), enabled=enabled) as progress:
            progress.advance(10)
            progress.flush()
        assert progress._thread is None and not progress.counting
    assert Store.calls == 0


def test_a_broken_store_never_fails_the_load(progress_log, quiet_threads):
    class Broken:
        def add(self, key, n):
            raise RuntimeError("store connection reset")

    with JobProgress(100, rank=0, key="broken", store=Broken(), enabled=True) as progress:
        progress.advance(60)
        progress.flush()
        progress.advance(40)
    assert progress.done_bytes == 100  # counted on locally
    with JobProgress(100, rank=1, key="broken", store=Broken(), enabled=True) as other:
        other.advance(5)
        other.flush()


# --- the summary line ---------------------------------------------------------------------------

def _report(**changes) -> LoadReport:
    fields = dict(rank=0, world_size=3, loaded_keys=["a", "b"], missing_keys=[],
                  unexpected_keys=["z"], files_read=["f"], bytes_read=3_000_000,
                  bytes_read_per_rank=[3_000_000, 5_000_000, 2_000_000],
                  total_bytes_read=10_000_000, bytes_received=0,
                  bytes_received_per_rank=[0, 0, 0], seconds=4.0, peak_host_memory=1_500_000,
                  peak_host_memory_per_rank=[1_500_000, 2_250_000, 750_000])
    return LoadReport(**(fields | changes))


def test_summary_names_the_slowest_rank_by_time_and_each_ranks_peak_memory():
    text = _report(seconds_per_rank=[1.5, 2.0, 3.25]).summary()
    assert "slowest rank 2 (3.25 s, read 2.00 MB)" in text, text  # not rank 1, which read most
    assert "peak private host memory per rank 1.50 MB, 2.25 MB, 0.75 MB" in text, text
    assert "loaded 2 tensors, 0.010 GB read across 3 rank(s) in 4.00 s;" in text, text
    assert text.endswith("0 missing, 1 unexpected keys") and "\n" not in text


def test_summary_without_per_rank_times_names_the_rank_that_read_most():
    text = _report().summary()
    assert "(max 5.00 MB on rank 1)" in text and "slowest" not in text, text


def test_summary_of_many_ranks_gives_the_range_of_peak_memory():
    n = 16
    memory = [1_000_000 + 10_000 * r for r in range(n)]
    memory[5] = 9_000_000
    text = _report(world_size=n, bytes_read_per_rank=[1] * n, bytes_received_per_rank=[0] * n,
                   peak_host_memory_per_rank=memory, seconds_per_rank=[1.0] * n).summary()
    assert "per rank from 1.00 MB (rank 0) to 9.00 MB (rank 5)" in text, text
    assert "slowest rank 0 (1.00 s" in text


def _load_with_progress(rank: int, world_size: int, path: str, progress) -> dict:
    from checkpoints import empty_model

    import distshard

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("distshard.progress").addHandler(handler)
    logging.getLogger("distshard.progress").setLevel(logging.INFO)
    report = distshard.load(empty_model("llama"), path, bucket_size=8192, progress=progress)
    return dict(lines=[r.getMessage() for r in records], total=report.total_bytes_read,
                summary=report.summary(), seconds=report.seconds_per_rank)


@pytest.mark.multiprocess
def test_a_load_draws_the_jobs_bytes_on_rank_0_only(checkpoints):
    results = run_ranks(_load_with_progress, 3, checkpoints["llama"], True, timeout=120)
    lines, total = results[0]["lines"], results[0]["total"]
    assert lines and "done in" in lines[-1], lines
    assert f"{total / 1e6:.2f} MB / {total / 1e6:.2f} MB (100%)" in lines[-1], (lines[-1], total)
    assert results[1]["lines"] == results[2]["lines"] == []  # the others stay quiet
    assert len(results[0]["seconds"]) == 3 and "slowest rank" in results[0]["summary"]
    off = run_ranks(_load_with_progress, 2, checkpoints["llama"], None, timeout=120)
    assert all(r["lines"] == [] for r in off)  # no terminal here: no bar unless asked
