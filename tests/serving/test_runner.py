"""`Runner`: calls run in its own thread, results and errors come back to the loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from torchgate.serving.runner import Runner


@contextmanager
def running() -> Iterator[Runner]:
    runner = Runner("runner-test")
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()


def test_a_call_runs_in_the_runner_thread_and_its_result_comes_back():
    async def body() -> None:
        with running() as runner:
            name = await runner.run(lambda: threading.current_thread().name)
            assert name == "runner-test"
            assert await runner.run(sum, [1, 2, 3]) == 6

    asyncio.run(body())


def test_an_error_is_raised_to_the_caller_and_the_runner_goes_on():
    def fails() -> None:
        raise ValueError("bad row")

    async def body() -> None:
        with running() as runner:
            with pytest.raises(ValueError, match="bad row"):
                await runner.run(fails)
            assert await runner.run(len, "abc") == 3

    asyncio.run(body())


def test_calls_run_one_at_a_time_in_order():
    seen: list[int] = []

    async def body() -> None:
        with running() as runner:
            await asyncio.gather(*(runner.run(seen.append, i) for i in range(100)))

    asyncio.run(body())
    assert seen == list(range(100))


def test_a_cancelled_caller_is_not_answered_and_the_runner_goes_on():
    gate = threading.Event()

    async def body() -> None:
        with running() as runner:
            held = runner.run(gate.wait, 10)
            held.cancel()
            gate.set()
            assert await runner.run(lambda: "next") == "next"
            assert held.cancelled()

    asyncio.run(body())


def test_stop_finishes_the_calls_handed_over_then_ends_the_thread():
    done: list[int] = []

    async def body() -> Runner:
        runner = Runner("runner-test")
        runner.start()
        for i in range(5):
            runner.run(done.append, i)
        runner.stop()
        return runner

    runner = asyncio.run(body())
    assert done == list(range(5))
    runner.stop()  # a second stop is harmless
    assert not any(t.name == "runner-test" for t in threading.enumerate())
