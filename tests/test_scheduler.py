"""The serving queue's admission, without a model: a server with ``slots`` workers and ``max_queue`` places
takes exactly ``slots + max_queue`` requests at once, whether or not its workers have woken to take them yet.
CI once refused the eighth of eight clients (2 slots + 6 places) because a worker that had not yet taken its
job left it counted as waiting; holding the scheduler's lock here keeps every worker asleep, so that moment
is made on purpose instead of hoped for."""

import threading

import pytest

from backend.serve.engine import QueueFull, Scheduler


def held_until(gate: threading.Event):
    """A job's work: it runs until ``gate`` opens (or it is cancelled), then yields one piece."""
    def work(cancel: threading.Event):
        while not gate.wait(0.01):
            if cancel.is_set():
                return
        yield "done"
    return work


@pytest.fixture
def gate():
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def scheduler():
    s = Scheduler(slots=2, max_queue=1)
    yield s
    s.close()


def test_capacity_counts_jobs_no_worker_has_taken_yet(scheduler, gate):
    with scheduler._cond:  # reentrant: submit takes it too, the workers cannot pop meanwhile
        jobs = [scheduler.submit(held_until(gate)) for _ in range(3)]
        assert scheduler.load() == (0, 3)
        with pytest.raises(QueueFull, match=r"0 replies running and 3 waiting \(--max-queue 1\)"):
            scheduler.submit(held_until(gate))
    gate.set()
    assert [list(job) for job in jobs] == [["done"]] * 3


def test_busy_slots_leave_max_queue_places_and_a_leaver_frees_one(scheduler, gate):
    running = [scheduler.submit(held_until(gate)) for _ in range(2)]
    for job in running:
        assert job.started.wait(60), "a free worker took no job"
    waiting = scheduler.submit(held_until(gate))
    assert scheduler.load() == (2, 1)
    with pytest.raises(QueueFull, match="2 replies running and 1 waiting"):
        scheduler.submit(held_until(gate))
    waiting.cancel()  # its client left: the place is free at once
    last = scheduler.submit(held_until(gate))
    gate.set()
    assert [list(job) for job in [*running, last]] == [["done"]] * 3
