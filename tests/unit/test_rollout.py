from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import inferd.rollout
from inferd.errors import InvalidArgument, NotFound
from inferd.manager import ModelManager
from inferd.metrics import Metrics
from inferd.rollout import Guard, RolloutBook, Rollouts, _p99_ms
from inferd.shared_state import SharedState
from tests.unit.test_manager import FakeLoader, plan


def test_guards_parse_absolute_and_relative_bounds() -> None:
    assert Guard.parse("error_rate<=0.01") == Guard("error_rate", "<=", 0.01, False)
    assert Guard.parse(" p99_ms <= 1.2*baseline ") == Guard("p99_ms", "<=", 1.2, True)
    assert Guard.parse("agreement>=0.98") == Guard("agreement", ">=", 0.98, False)
    assert str(Guard.parse("p99_ms<=1.2*baseline")) == "p99_ms<=1.2*baseline"


def test_a_guard_reads_back_from_its_text_as_it_was_given() -> None:
    # The step loop and a restarted server parse the stored text: ':g' kept 6 digits.
    for text in ("error_rate<=0.0012345678", "p99_ms<=1234567", "p99_ms<=1.25*baseline", "agreement>=0.98"):
        assert Guard.parse(str(Guard.parse(text))) == Guard.parse(text)
        assert str(Guard.parse(text)) == text


@pytest.mark.parametrize(
    "text", ["latency<=3", "error_rate=0.1", "p99_ms<=fast", "agreement>=1.2.3", "p99_ms<=1e999*baseline"]
)
def test_a_bad_guard_names_the_expected_form(text: str) -> None:
    with pytest.raises(InvalidArgument, match="guard"):
        Guard.parse(text)


def test_guards_hold_on_missing_readings_and_compare_with_the_baseline() -> None:
    guard = Guard.parse("p99_ms<=1.2*baseline")
    assert guard.holds(11.0, 10.0)
    assert not guard.holds(13.0, 10.0)
    assert guard.holds(None, 10.0)
    assert guard.holds(13.0, None)
    assert not Guard.parse("error_rate<=0.01").holds(0.02, None)


def test_p99_is_placed_linearly_inside_the_bucket_holding_it() -> None:
    """As Prometheus's ``histogram_quantile``: with the bucket's upper bound instead, a relative
    guard could not tell 0.99 ms from 1.01 ms (1 against 2.5) nor 0.51 from 0.99 (both 1)."""
    assert _p99_ms([0] * 18) is None
    buckets = [0] * 18
    buckets[4] = 99  # (0.5, 1] ms
    buckets[7] = 1  # (5, 10] ms
    assert _p99_ms(buckets) == pytest.approx(1.0)  # the 99th of 100 is the last of the 99
    buckets[7] = 2
    assert _p99_ms(buckets) == pytest.approx(5 + 5 * 0.99 / 2)  # rank 99.99: 0.99 into 2 requests
    buckets = [0] * 18
    buckets[4] = 1000
    assert _p99_ms(buckets) == pytest.approx(0.5 + 0.5 * 0.99)
    buckets[17] = 1000  # past the last bound (10 s): that bound
    assert _p99_ms(buckets) == pytest.approx(10_000)


def test_operator_actions_follow_the_state_and_a_paused_rollout_stays_paused_across_a_restart(
    tmp_path: Path,
) -> None:
    async def serve(pool: ThreadPoolExecutor) -> tuple[ModelManager[Any], Rollouts]:
        manager: ModelManager[Any] = ModelManager(pool, FakeLoader())
        await manager.apply([plan([1, 2], {"stable": 1})])
        return manager, Rollouts(manager, Metrics(), None, tmp_path)

    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            manager, rollouts = await serve(pool)
            with pytest.raises(NotFound, match="model m has no rollout"):
                await rollouts.command("m", "pause", b"")
            started = await rollouts.command("m", "start", b'{"to": 2, "steps": [20, 100], "step_s": 600}')
            assert (started["state"], started["weights"]) == ("running", {"2": 20.0, "1": 80.0})
            assert (await rollouts.command("m", "pause", b""))["state"] == "paused"
            with pytest.raises(InvalidArgument, match="already paused"):
                await rollouts.command("m", "start", b'{"to": 2}')
            await rollouts.close()
            await manager.close()

            manager, rollouts = await serve(pool)  # a restarted server
            await rollouts.restore()
            state = await rollouts.status("m")
            assert (state["state"], state["step"], state["weights"]) == ("paused", 0, {"2": 20.0, "1": 80.0})
            assert (await rollouts.command("m", "resume", b""))["state"] == "running"
            with pytest.raises(InvalidArgument, match="is running; resume needs one that is paused"):
                await rollouts.command("m", "resume", b"")
            aborted = await rollouts.command("m", "abort", b"")
            assert (aborted["state"], aborted["weights"]) == ("rolled_back", {"1": 100.0})
            assert aborted["history"][-1]["failed"] == ["aborted by an operator"]
            assert manager.labels("m") == {"stable": 1}
            with pytest.raises(InvalidArgument, match="rollout action 'jump'"):
                await rollouts.command("m", "jump", b"")
            await rollouts.close()
            await manager.close()

    asyncio.run(main())


def test_a_finished_rollout_whose_canary_is_gone_does_not_stop_a_restarted_server(tmp_path: Path) -> None:
    # restore() raised (the label could not move to version 2), so the server did not start.
    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            manager: ModelManager[Any] = ModelManager(pool, FakeLoader())
            await manager.apply([plan([1, 2], {"stable": 1})])
            rollouts = Rollouts(manager, Metrics(), None, tmp_path)
            await rollouts.command("m", "start", b'{"to": 2, "steps": [100], "step_s": 600}')
            assert (await rollouts.command("m", "promote", b""))["state"] == "done"
            await rollouts.close()
            await manager.close()

            manager = ModelManager(pool, FakeLoader())
            await manager.apply([plan([1], {"stable": 1})])  # version 2 was removed meanwhile
            rollouts = Rollouts(manager, Metrics(), None, tmp_path)
            await rollouts.restore()
            assert manager.labels("m") == {"stable": 1}
            with pytest.raises(NotFound, match="model m has no rollout"):
                await rollouts.status("m")
            await rollouts.close()
            await manager.close()

    asyncio.run(main())


def test_a_label_a_finished_rollout_moved_stays_moved_after_a_later_rollout_and_a_restart(
    tmp_path: Path,
) -> None:
    # The later rollout's state file replaced the finished one's: at a restart the label went back
    # to the configured version 1 while the rolled-back split held version 2.
    async def serve(pool: ThreadPoolExecutor) -> tuple[ModelManager[Any], Rollouts]:
        manager: ModelManager[Any] = ModelManager(pool, FakeLoader())
        await manager.apply([plan([1, 2, 3], {"stable": 1})])
        return manager, Rollouts(manager, Metrics(), None, tmp_path)

    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            manager, rollouts = await serve(pool)
            await rollouts.command("m", "start", b'{"to": 2, "steps": [100], "step_s": 600}')
            await rollouts.command("m", "promote", b"")
            await rollouts.command("m", "start", b'{"to": 3, "steps": [10, 100], "step_s": 600}')
            assert (await rollouts.command("m", "abort", b""))["weights"] == {"2": 100.0}
            assert manager.labels("m") == {"stable": 2}
            await rollouts.close()
            await manager.close()

            manager, rollouts = await serve(pool)  # a restarted server
            await rollouts.restore()
            assert manager.labels("m") == {"stable": 2}
            assert (await rollouts.status("m"))["weights"] == {"2": 100.0}
            await rollouts.close()
            await manager.close()

    asyncio.run(main())


def test_a_new_rollout_shows_no_readings_of_the_step_of_the_one_before() -> None:
    # Its start answer measured its versions against the last step of the rollout before: version
    # 2's requests as the new baseline's, from version 1's count at that step's start.
    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            manager: ModelManager[Any] = ModelManager(pool, FakeLoader())
            await manager.apply([plan([1, 2, 3], {"stable": 1})])
            metrics = Metrics()
            rollouts = Rollouts(manager, metrics)
            await rollouts.command("m", "start", b'{"to": 2, "steps": [100], "step_s": 600}')
            await asyncio.sleep(0)  # its step starts: the readings it will be measured against
            for _ in range(5):
                metrics.count_request("m", "2", "rest", "OK")
                metrics.timer("m", "2", "rest").stages["total"].observe(0.003)
            await rollouts.command("m", "promote", b"")
            assert (await rollouts.command("m", "start", b'{"to": 3, "steps": [100], "step_s": 600}'))[
                "current"
            ] == {}
            await rollouts.close()
            await manager.close()

    asyncio.run(main())


def test_a_rollout_whose_model_is_unloaded_ends_rolled_back() -> None:
    # Its rollback raised NotFound in turn: the task died and the rollout stayed 'running' for
    # ever (and inferd rollout, following it, with it).
    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            manager: ModelManager[Any] = ModelManager(pool, FakeLoader())
            await manager.apply([plan([1, 2], {"stable": 1})])
            rollouts = Rollouts(manager, Metrics())
            await rollouts.command("m", "start", b'{"to": 2, "steps": [50, 100], "step_s": 0.01}')
            await manager.remove("m")
            for _ in range(500):
                if (await rollouts.status("m"))["state"] != "running":
                    break
                await asyncio.sleep(0.01)
            state = await rollouts.status("m")
            assert state["state"] == "rolled_back"
            assert state["history"][-1]["failed"] == ["internal error; see the log"]
            await rollouts.close()
            await manager.close()

    asyncio.run(main())


def test_a_step_waits_for_min_requests_before_its_guards_are_checked() -> None:
    # Without traffic every guard held for want of readings, and the label moved to a canary no
    # request had reached.
    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            manager: ModelManager[Any] = ModelManager(pool, FakeLoader())
            await manager.apply([plan([1, 2], {"stable": 1})])
            metrics = Metrics()
            rollouts = Rollouts(manager, metrics)
            body = (
                b'{"to": 2, "steps": [100], "step_s": 0.02, "guards": ["error_rate<=0.5"], "min_requests": 3}'
            )
            await rollouts.command("m", "start", body)
            await asyncio.sleep(0.2)  # ten steps' time without a request
            state = await rollouts.status("m")
            assert state["state"] == "running"
            assert [e["event"] for e in state["history"]] == ["started", "step", "waiting for requests"]
            assert state["history"][-1]["answered"] == 0
            metrics.count_request("m", "2", "rest", "OK")
            metrics.count_request("m", "2", "rest", "OK")
            metrics.count_request("m", "2", "rest", "INVALID_ARGUMENT")
            for _ in range(500):
                if (await rollouts.status("m"))["state"] != "running":
                    break
                await asyncio.sleep(0.01)
            state = await rollouts.status("m")
            assert state["state"] == "done"  # 1 failed of 3: within the guard
            assert state["checked"]["error_rate"]["canary"] == pytest.approx(1 / 3)
            await rollouts.close()
            await manager.close()

    asyncio.run(main())


@pytest.mark.parametrize("value", ["-1", "1.5", "true", '"3"'])
def test_min_requests_must_be_a_whole_number(value: str) -> None:
    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            manager: ModelManager[Any] = ModelManager(pool, FakeLoader())
            await manager.apply([plan([1, 2], {"stable": 1})])
            rollouts = Rollouts(manager, Metrics())
            body = f'{{"to": 2, "min_requests": {value}}}'.encode()
            with pytest.raises(InvalidArgument, match="'min_requests' must be a whole number >= 0"):
                await rollouts.command("m", "start", body)
            await manager.close()

    asyncio.run(main())


async def _workers(
    pool: ThreadPoolExecutor, folder: Path | None
) -> tuple[list[ModelManager[Any]], list[Rollouts], list[asyncio.Task[None]]]:
    """Two workers' managers and rollouts sharing ``folder`` (labels moved in both, as the admin
    state does), each following the other every 10 ms; with ``folder`` None, one process's."""
    managers: list[ModelManager[Any]] = []
    for _ in range(1 if folder is None else 2):
        manager: ModelManager[Any] = ModelManager(pool, FakeLoader())
        await manager.apply([plan([1, 2], {"stable": 1})])
        managers.append(manager)

    async def move_label(model: str, label: str, version: int) -> None:
        for manager in managers:
            manager.move_label(model, label, version)

    rollouts = [
        Rollouts(
            m,
            Metrics(),
            None,
            None,
            None if folder is None else SharedState[RolloutBook](folder, "rollouts", n),
            None,
            move_label,
        )
        for n, m in enumerate(managers)
    ]
    for each in rollouts:
        await each.restore()

    async def follow(each: Rollouts) -> None:
        while True:
            await asyncio.sleep(0.01)
            each.follow()

    return managers, rollouts, [asyncio.create_task(follow(each)) for each in rollouts]


async def _close(
    managers: list[ModelManager[Any]], rollouts: list[Rollouts], followers: list[asyncio.Task[None]]
) -> None:
    for task in followers:
        task.cancel()
    for each, manager in zip(rollouts, managers, strict=True):
        await each.close()
        await manager.close()


def test_commands_through_the_worker_not_running_the_steps_hold_in_both(tmp_path: Path) -> None:
    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            managers, rollouts, followers = await _workers(pool, tmp_path)
            await asyncio.sleep(0.05)
            assert sorted(r._driving for r in rollouts) == [False, True]
            other = next(r for r in rollouts if not r._driving)
            await other.command("m", "start", b'{"to": 2, "steps": [50, 100], "step_s": 0.05}')
            assert [m.split("m").percents() for m in managers] == [{"1": 50.0, "2": 50.0}] * 2  # type: ignore[union-attr]
            await other.command("m", "pause", b"")
            paused = [(await r.status("m"))["history"] for r in rollouts]
            await asyncio.sleep(0.2)  # four steps' time: nothing moves while paused
            assert [(await r.status("m"))["history"] for r in rollouts] == paused
            assert paused[0][-1]["event"] == "paused"
            assert (await other.command("m", "resume", b""))["state"] == "running"
            for _ in range(300):  # done once the label has moved, in every worker
                if [(await r.status("m"))["state"] for r in rollouts] == ["done", "done"]:
                    break
                await asyncio.sleep(0.01)
            states = [await r.status("m") for r in rollouts]
            assert [s["state"] for s in states] == ["done", "done"]
            assert [e["event"] for e in states[0]["history"]][-3:] == ["step", "moving the label", "done"]
            assert [m.labels("m") for m in managers] == [{"stable": 2}] * 2
            assert [m.split("m") for m in managers] == [None, None]
            await _close(managers, rollouts, followers)

    asyncio.run(main())


def test_a_worker_that_had_not_followed_yet_applies_what_it_read_when_its_own_command_is_refused(
    tmp_path: Path,
) -> None:
    # It read the abort under the lock, refused its own pause for it, and never applied it: its
    # split stayed on the canary, and the abort waited for it for SYNC_TIMEOUT_S.
    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            managers, rollouts, followers = await _workers(pool, tmp_path)
            await rollouts[0].command("m", "start", b'{"to": 2, "steps": [10, 100], "step_s": 600}')
            followers[1].cancel()  # worker 1 does not look for changes for now
            abort = asyncio.create_task(rollouts[0].command("m", "abort", b""))
            await asyncio.sleep(0.05)
            assert not abort.done()  # waiting for worker 1 to apply it
            with pytest.raises(InvalidArgument, match="is rolled_back; pause needs one that is running"):
                await rollouts[1].command("m", "pause", b"")
            assert managers[1].split("m").percents() == {"1": 100.0}  # type: ignore[union-attr]
            assert (await asyncio.wait_for(abort, 1.0))["state"] == "rolled_back"
            await _close(managers, rollouts, followers)

    asyncio.run(main())


def test_a_resumed_rollout_shows_no_readings_of_the_step_before_its_pause() -> None:
    # Its readings were kept: the resumed step's "current" counted the requests from before the
    # pause (and the paused time) against the step that starts again.
    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            managers, rollouts_of, followers = await _workers(pool, None)
            rollouts, metrics = rollouts_of[0], rollouts_of[0]._metrics
            await rollouts.command("m", "start", b'{"to": 2, "steps": [50, 100], "step_s": 600}')
            await asyncio.sleep(0)  # its step starts
            metrics.count_request("m", "2", "rest", "INTERNAL")
            assert (await rollouts.status("m"))["current"]["error_rate"]["canary"] == 1.0
            await rollouts.command("m", "pause", b"")
            assert (await rollouts.command("m", "resume", b""))["current"] == {}
            await asyncio.sleep(0)  # the step starts again
            assert (await rollouts.status("m"))["current"]["error_rate"]["canary"] is None
            await _close(managers, rollouts_of, followers)

    asyncio.run(main())


def test_a_rollout_stopped_while_its_label_moved_finishes_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A restart read "running" and rolled it back (on_restart = rollback) or ran its steps again
    # (resume), though its steps had passed or it had been promoted.
    monkeypatch.setattr(inferd.rollout, "PROMOTE_WAIT_S", 0.1)

    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            manager: ModelManager[Any] = ModelManager(pool, FakeLoader())
            await manager.apply([plan([1, 2], {"stable": 1})])
            held = asyncio.Event()

            async def stuck(model: str, label: str, version: int) -> None:
                await held.wait()  # an admin move waiting behind a long load

            rollouts = Rollouts(manager, Metrics(), None, tmp_path, None, None, stuck)
            await rollouts.command("m", "start", b'{"to": 2, "steps": [20, 100], "step_s": 600}')
            promoted = await rollouts.command("m", "promote", b"")  # answers after PROMOTE_WAIT_S
            assert promoted["state"] == "running"
            assert promoted["history"][-1]["event"] == "moving the label"
            await rollouts.close()  # the server stops before the label moved
            await manager.close()

            manager = ModelManager(pool, FakeLoader())
            await manager.apply([plan([1, 2], {"stable": 1})])
            rollouts = Rollouts(manager, Metrics(), None, tmp_path)
            await rollouts.restore()
            for _ in range(300):
                if (await rollouts.status("m"))["state"] != "running":
                    break
                await asyncio.sleep(0.01)
            state = await rollouts.status("m")
            assert [e["event"] for e in state["history"]][-3:] == ["promoted", "moving the label", "done"]
            assert manager.labels("m") == {"stable": 2}
            await rollouts.close()
            await manager.close()

    asyncio.run(main())
