"""Merging the expositions of several workers into one ``/metrics``."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from inferd.metrics import Metrics
from inferd.shadow import ShadowMirror
from inferd.worker_metrics import WorkerMetrics, cumulative, merge, requests_in, shadow_rows_in, socket_path


def _table(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def _worker(requests: int, in_flight: int, seconds: float) -> bytes:
    metrics = Metrics()
    for _ in range(requests):
        metrics.count_request("m", "1", "tfserving_rest", "OK")
        metrics.timer("m", "1", "tfserving_rest").observe(*[seconds] * 7)
    metrics.in_flight = in_flight
    metrics.gauge("inferd_batcher_target_batch_size", "target", lambda: iter([(("m", "1"), 8.0)]))
    return metrics.exposition()


def test_counters_histograms_and_shares_are_summed_and_alike_gauges_kept_once() -> None:
    merged = _table(merge([(0, _worker(3, 2, 0.001)), (1, _worker(5, 1, 0.2))]))
    rest = frozenset({"model": "m", "version": "1", "protocol": "tfserving_rest", "status": "OK"}.items())
    assert merged[("inferd_requests_total", rest)] == 8
    total = {"model": "m", "version": "1", "protocol": "tfserving_rest", "stage": "total"}
    assert merged[("inferd_request_duration_seconds_count", frozenset(total.items()))] == 8
    assert (
        merged[("inferd_request_duration_seconds_bucket", frozenset({**total, "le": "0.001"}.items()))] == 3
    )
    assert merged[("inferd_request_duration_seconds_sum", frozenset(total.items()))] == 3 * 0.001 + 5 * 0.2
    assert merged[("inferd_in_flight_requests", frozenset())] == 3
    target = frozenset({"model": "m", "version": "1"}.items())
    assert merged[("inferd_batcher_target_batch_size", target)] == 8  # every worker reports it alike
    assert (
        merged[
            ("inferd_worker_requests_total", frozenset({"worker": "0", "protocol": "tfserving_rest"}.items()))
        ]
        == 3
    )
    assert (
        merged[
            ("inferd_worker_requests_total", frozenset({"worker": "1", "protocol": "tfserving_rest"}.items()))
        ]
        == 5
    )
    assert merged[("inferd_workers_scraped", frozenset())] == 2


def test_a_label_set_only_one_worker_has_is_kept() -> None:
    other = Metrics()
    other.count_request("n", "4", "v2_grpc", "NOT_FOUND")
    merged = _table(merge([(0, _worker(1, 0, 0.01)), (1, other.exposition())]))
    key = frozenset({"model": "n", "version": "4", "protocol": "v2_grpc", "status": "NOT_FOUND"}.items())
    assert merged[("inferd_requests_total", key)] == 1


def test_label_values_with_any_characters_are_merged_as_they_are() -> None:
    """Prometheus escapes only backslash, quote and newline in a label value: a model named with
    another line break of Unicode's (carriage return, U+2028, NEL) must not split its sample."""
    names = ['q"uote', "back\\slash", "new\nline", "carriage\rreturn", "line\u2028separator", "nel\x85"]
    one = Metrics()
    for name in names:
        one.count_request(name, "1", "v2_rest", "OK")
    merged = _table(merge([(0, one.exposition()), (1, one.exposition())]))
    for name in names:
        key = frozenset({"model": name, "version": "1", "protocol": "v2_rest", "status": "OK"}.items())
        assert merged[("inferd_requests_total", key)] == 2, name
    worker = frozenset({"worker": "0", "protocol": "v2_rest"}.items())
    assert merged[("inferd_worker_requests_total", worker)] == len(names)


def _requests(text: bytes) -> float:
    key = frozenset({"model": "m", "version": "1", "protocol": "tfserving_rest", "status": "OK"}.items())
    return _table(text)[("inferd_requests_total", key)]


def test_counters_never_go_back_when_a_worker_stops_answering_or_is_replaced(tmp_path: Path) -> None:
    # A worker killed (or too slow to answer a scrape) took its counts out of /metrics, which
    # Prometheus reads as a reset of every counter: rate() then counted the survivors' totals again.
    async def main() -> None:
        counts = {0: _worker(3, 1, 0.001), 1: _worker(5, 1, 0.001)}
        first = WorkerMetrics(tmp_path, 0, lambda: counts[0])
        second = WorkerMetrics(tmp_path, 1, lambda: counts[1])
        await first.serve()
        await second.serve()
        merged = await first.exposition()
        assert _requests(merged) == 8
        assert _table(merged)[("inferd_workers_scraped", frozenset())] == 2

        await second.close()  # killed: its socket no longer answers
        merged = await first.exposition()
        assert _requests(merged) == 8  # its last counts, merged from the copy of the last scrape
        table = _table(merged)
        assert table[("inferd_workers_scraped", frozenset())] == 1
        assert table[("inferd_in_flight_requests", frozenset())] == 1  # a dead worker's gauges go

        counts[1] = _worker(2, 0, 0.001)  # its successor starts counting from 0
        successor = WorkerMetrics(tmp_path, 1, lambda: counts[1])
        await successor.serve()
        for scraped_by in (first, successor):
            merged = await scraped_by.exposition()
            assert _requests(merged) == 3 + 5 + 2
            worker_1 = frozenset({"worker": "1", "protocol": "tfserving_rest"}.items())
            assert _table(merged)[("inferd_worker_requests_total", worker_1)] == 5 + 2
        await first.close()
        await successor.close()

    asyncio.run(main())


def test_a_worker_whose_socket_file_went_with_it_is_merged_from_its_last_counts(tmp_path: Path) -> None:
    # Python 3.13's asyncio removes a Unix server's socket file when it closes: the stopped
    # worker was no longer found, and its counts left /metrics until a successor started.
    async def main() -> None:
        first = WorkerMetrics(tmp_path, 0, lambda: _worker(3, 0, 0.001))
        second = WorkerMetrics(tmp_path, 1, lambda: _worker(5, 0, 0.001))
        await first.serve()
        await second.serve()
        assert _requests(await first.exposition()) == 8
        await second.close()
        socket_path(tmp_path, 1).unlink(missing_ok=True)
        merged = await first.exposition()
        assert _requests(merged) == 8
        assert _table(merged)[("inferd_workers_scraped", frozenset())] == 1
        await first.close()

    asyncio.run(main())


def test_cumulative_keeps_counters_and_histograms_with_their_headers_only() -> None:
    text = cumulative(_worker(2, 4, 0.001)).decode()
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families["inferd_requests"] == "counter"
    assert families["inferd_request_duration_seconds"] == "histogram"
    assert "inferd_in_flight_requests" not in families
    assert "inferd_batcher_target_batch_size" not in families
    assert text.count("# TYPE inferd_requests_total counter") == 1
    assert text.count("# HELP inferd_requests_total ") == 1


def test_a_versions_requests_read_from_merged_expositions_are_what_each_worker_counted() -> None:
    # What a rollout's guards read under --workers: requests_of summed over the workers.
    workers = [Metrics(), Metrics()]
    for n, metrics in enumerate(workers):
        for protocol, status, seconds in [
            ("tfserving_rest", "OK", 0.0004),
            ("v2_grpc", "NOT_FOUND", 0.03),
        ] * (n + 2):
            metrics.count_request("m", "2", protocol, status)
            metrics.timer("m", "2", protocol).observe(*[seconds] * 7)
        metrics.count_request("m", "1", "tfserving_rest", "OK")  # another version
        metrics.count_request("m2", "2", "tfserving_rest", "OK")  # another model
    merged = merge([(n, metrics.exposition()) for n, metrics in enumerate(workers)])
    one, two = (metrics.requests_of("m", "2") for metrics in workers)
    expected = (one[0] + two[0], one[1] + two[1], [a + b for a, b in zip(one[2], two[2], strict=True)])
    assert requests_in(merged, "m", "2") == expected
    assert expected[:2] == (10, 5)
    assert requests_in(merged, "m", "3") == (0, 0, [0] * len(expected[2]))


def test_shadow_agreement_read_from_merged_expositions_sums_the_workers() -> None:
    def worker(agreeing: int, rows: int) -> bytes:
        metrics = Metrics()
        mirror = ShadowMirror(None, metrics)  # type: ignore[arg-type]  # nothing is mirrored here
        try:
            mirror._pair("m", 1, 2).agreeing, mirror._pair("m", 1, 2).rows = agreeing, rows
            mirror._pair("m", 1, 3).agreeing = mirror._pair("m", 1, 3).rows = 50  # another pair
            return metrics.exposition()
        finally:
            asyncio.run(mirror.close())

    merged = merge([(0, worker(7, 8)), (1, worker(2, 4))])
    assert shadow_rows_in(merged, "m", 1, 2) == (9, 12)
    assert shadow_rows_in(merged, "m", 2, 1) == (0, 0)
