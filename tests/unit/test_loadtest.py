"""The load generator's pieces that need no server: response parsing, encoding, the schedule."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from inferd.loadtest.drivers import Samples, _Connection, _Recorder, _schedule
from inferd.loadtest.payloads import build


class Answers:
    """Collects what a connection reports (the part of the HTTP driver a connection calls)."""

    request = b""

    def __init__(self) -> None:
        self.statuses: list[str] = []

    def answered(self, connection: _Connection, status: str) -> None:
        self.statuses.append(status)

    def lost(self, connection: _Connection) -> None:
        self.statuses.append("lost")


def feed(*pieces: bytes) -> list[str]:
    answers = Answers()
    connection = _Connection(answers)  # type: ignore[arg-type]
    for piece in pieces:
        connection.data_received(piece)
    return answers.statuses


OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"a": [1]}\n'
BAD = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}"
CHUNKED = (
    b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n3\r\n 10\r\n0\r\n\r\n"
)


def test_responses_are_parsed_whole_split_anywhere_and_pipelined() -> None:
    assert feed(OK) == ["200"]
    assert feed(*(OK[i : i + 1] for i in range(len(OK)))) == ["200"]
    assert feed(OK + BAD + OK) == ["200", "400", "200"]
    assert feed((OK + BAD)[:70], (OK + BAD)[70:]) == ["200", "400"]


def test_chunked_bodies_end_at_their_last_chunk_even_when_it_arrives_in_pieces() -> None:
    assert feed(CHUNKED + OK) == ["503", "200"]
    for cut in range(len(CHUNKED) - 6, len(CHUNKED)):
        assert feed(CHUNKED[:cut], CHUNKED[cut:] + BAD) == ["503", "400"], cut


def test_v2_binary_request_carries_the_tensors_after_the_json_header(tmp_path: Path) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.savez(tmp_path / "t.npz", x=x)
    payload = build("http://127.0.0.1:9", "v2-binary", "m", version=3, payload=tmp_path / "t.npz")
    head, body = payload.request.split(b"\r\n\r\n", 1)
    lines = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    assert head.startswith(b"POST /v2/models/m/versions/3/infer HTTP/1.1")
    assert int(lines["Content-Length"]) == len(body)
    split = int(lines["Inference-Header-Content-Length"])
    header = json.loads(body[:split])
    assert header["inputs"] == [
        {"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 24}}
    ]
    assert body[split:] == x.tobytes()
    assert payload.instances == 2


def test_a_json_payload_is_sent_as_is_and_refused_for_grpc(tmp_path: Path) -> None:
    body = b'{"instances": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]}'
    (tmp_path / "b.json").write_bytes(body)
    payload = build("http://127.0.0.1:9", "rest", "m", payload=tmp_path / "b.json")
    assert payload.request.endswith(b"\r\n\r\n" + body)
    assert b"POST /v1/models/m:predict HTTP/1.1" in payload.request
    assert payload.instances == 3
    (tmp_path / "own.json").write_text('{"data": [[1, 2]]}')
    payload = build(
        "http://127.0.0.1:9", "rest", "m", payload=tmp_path / "own.json", path="/predict", instances=4
    )
    assert payload.request.startswith(b"POST /predict HTTP/1.1")
    assert payload.instances == 4  # the body does not say; --instances does
    with pytest.raises(ValueError, match=r"needs \.npy or \.npz"):
        build("127.0.0.1:9", "grpc", "m", payload=tmp_path / "b.json")


def test_a_rest_url_with_a_path_sends_to_the_routes_under_it(tmp_path: Path) -> None:
    (tmp_path / "b.json").write_bytes(b'{"instances": [[1.0]]}')
    np.savez(tmp_path / "t.npz", x=np.zeros((1, 2), np.float32))
    for protocol, route in (("rest", "v1/models/m:predict"), ("v2-binary", "v2/models/m/infer")):
        for body in ("b.json", "t.npz") if protocol == "rest" else ("t.npz",):
            payload = build("http://127.0.0.1:9/serving/", protocol, "m", payload=tmp_path / body)
            assert payload.request.startswith(f"POST /serving/{route} HTTP/1.1".encode())


def test_the_open_loop_schedule_dispatches_every_due_time_in_the_window_once() -> None:
    due: list[int] = []

    async def run() -> None:
        import time

        start = time.monotonic_ns()
        await _schedule(1000.0, start, start + 50_000_000, due.append)
        assert due[0] == start

    asyncio.run(run())
    assert len(due) == 50
    assert np.allclose(np.diff(due), 1_000_000, atol=1)


def test_only_requests_due_in_the_window_count_and_samples_merge() -> None:
    recorder = _Recorder(window_start_ns=100, window_end_ns=200)
    recorder.record(50, 120, "200")  # warm-up
    recorder.record(100, 130, "200")
    recorder.record(150, 400, "503")
    recorder.record(199, 210, "200")
    recorder.record(200, 220, "200")  # after the window
    first = recorder.samples()
    assert first.latencies_ns.tolist() == [30, 11]  # successful requests only
    assert first.statuses == {"200": 2, "503": 1}
    assert first.all_statuses == {"200": 4, "503": 1}
    merged = Samples.merge([first, first])
    assert merged.statuses == {"200": 4, "503": 2}
    assert len(merged.latencies_ns) == 4


def test_bench_refuses_unreadable_tls_files_before_any_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from inferd.cli import main

    target = ["bench", "https://127.0.0.1:9", "--model", "m", "--duration", "1"]
    assert main([*target, "--tls-ca", str(tmp_path / "absent.pem")]) == 2
    assert "--tls-ca/--tls-cert/--tls-key" in capsys.readouterr().err
    (tmp_path / "junk.pem").write_text("not a certificate")
    assert main([*target, "--tls-ca", str(tmp_path / "junk.pem")]) == 2
    assert main([*target, "--tls-key", str(tmp_path / "junk.pem")]) == 2
    assert "--tls-key needs --tls-cert" in capsys.readouterr().err


def test_a_server_that_stops_during_a_step_has_no_usage_rather_than_a_wrong_one() -> None:
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from inferd.loadtest.serverside import ServerWatch

    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    watch = ServerWatch(process.pid, None)
    watch.start()
    process.kill()
    process.wait()  # reaped: /proc no longer has it
    assert watch.stop() is None

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"process_cpu_seconds_total 1.5\nprocess_resident_memory_bytes 1e8\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    watch = ServerWatch(None, f"http://127.0.0.1:{server.server_address[1]}/metrics")
    watch.start()
    server.shutdown()
    server.server_close()
    assert watch.stop() is None


def test_bench_refuses_a_server_pid_or_metrics_url_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from inferd.cli import main

    (tmp_path / "b.json").write_bytes(b'{"instances": [[1.0]]}')
    target = ["bench", "http://127.0.0.1:9", "--model=m", f"--payload={tmp_path / 'b.json'}", "--warmup=0"]
    assert main([*target, "--server_pid=4194305"]) == 2  # above any pid_max
    assert "--server_pid: cannot read the server's usage: no process 4194305" in capsys.readouterr().err
    assert main([*target, "--metrics_url=http://127.0.0.1:9/metrics"]) == 2
    assert "--metrics_url: cannot read the server's usage" in capsys.readouterr().err
    for pid in ("0", "-5"):  # no process to watch, not "watch nothing"
        with pytest.raises(SystemExit, match="2"):
            main([*target, "--duration=0.1", f"--server_pid={pid}"])
        assert "--server_pid" in capsys.readouterr().err


def test_bench_refuses_a_report_path_it_cannot_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from inferd.cli import main

    (tmp_path / "b.json").write_bytes(b'{"instances": [[1.0]]}')
    target = ["bench", "http://127.0.0.1:9", "--model=m", f"--payload={tmp_path / 'b.json'}", "--warmup=0"]
    for flag in ("--json", "--plot"):  # before any load
        assert main([*target, f"{flag}={tmp_path / 'absent' / 'report'}"]) == 2
        assert f"{flag} {tmp_path / 'absent' / 'report'}: no directory" in capsys.readouterr().err
    assert main([*target, "--duration=0.1", f"--json={tmp_path}"]) == 2  # a directory: after the load
    assert "inferd bench: cannot write the report: [Errno 21] Is a directory" in capsys.readouterr().err


def test_an_open_loop_says_when_the_generator_itself_fell_behind_its_schedule(tmp_path: Path) -> None:
    import dataclasses
    import time

    from inferd.loadtest.runner import BenchOptions, _report, progress_line, table

    start = time.monotonic_ns()
    recorder = _Recorder(start, start + 50_000_000)
    # 3 ms to send each request due every 1 ms: the 50th goes out about 100 ms late.
    asyncio.run(_schedule(1000, start, recorder.window_end_ns, lambda due: time.sleep(0.003), recorder))
    late = recorder.samples()
    assert len(late.send_lags_ns) == 50
    on_time = dataclasses.replace(late, send_lags_ns=np.full(50, 300_000))  # 0.3 ms each
    (tmp_path / "b.json").write_bytes(b'{"instances": [[1.0]]}')
    payload = build("http://127.0.0.1:9", "rest", "m", payload=tmp_path / "b.json")
    options = BenchOptions(url="http://127.0.0.1:9", model="m", duration_s=0.05)
    for samples, behind in ((late, True), (on_time, False)):
        report = _report(options, payload, "open", 1000, samples, None)
        assert report.fell_behind is behind
        assert ("the load generator fell behind" in table([report])) is behind
        assert ("the load generator fell behind" in progress_line(report, 1, 1)) is behind
    assert _report(options, payload, "open", 1000, late, None).send_lag_ms["max"] > 50
