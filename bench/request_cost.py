"""What one request costs inferd's REST application and gRPC servicers in CPU, in process: no
sockets, no HTTP or gRPC server.

    .venv/bin/python -m bench.request_cost [--requests 20000] [--rounds 5] [--profile FILE]
        [--profile-case CASE]

Drives inferd's ASGI application (``Server.http_app``, the digits model over TF Serving JSON and V2
JSON, one instance a request) with requests made in memory, and its gRPC servicers
(``PredictionServicer.Predict``, ``InferenceServicer.ModelInfer``) with messages parsed from bytes
and answers written back to bytes, as the gRPC server does, one at a time (``c=1``) and
from 64 concurrent tasks (``c=64``), and prints the CPU per request (``time.process_time``: every
thread of this process), the fastest of ``--rounds`` runs. Beside them, the floor: a bare ASGI
function doing only orjson, numpy and onnxruntime on the same body. What is left between the two
is inferd's own per-request work (routing, limits, validation, the version lease, metrics,
statistics, encoding), without the HTTP or gRPC server's, which ``bench.run --perf`` measures.
Run it pinned (``taskset -c 0``) on an idle machine; ``--profile`` writes a cProfile of one case's
c=1 loop (``--profile-case``: ``tf-json``, the default, ``v2-json``, ``tf-grpc`` or ``v2-grpc``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import onnxruntime as ort
import orjson
import uvloop

from bench import models
from inferd._proto import grpc_service_pb2, prediction_service_pb2
from inferd.config import ServerConfig
from inferd.protocols import encode_tensor, tfserving_grpc, v2_grpc
from inferd.protocols.http_connection import WATCH, RequestWatch
from inferd.protocols.limits import RequestLimits
from inferd.server import Server

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
Request = Callable[[], Awaitable[bool]]
"""One request, made afresh each time; whether it was answered as expected."""


class CallContext:
    """What inferd's servicers use of a gRPC call's context: no metadata, no deadline."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def time_remaining(self) -> float | None:
        return None

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    async def abort(self, code: Any, details: str = "") -> NoReturn:
        raise RuntimeError(f"the call failed: {code} {details}")


CONCURRENCY = (1, 64)
PROFILE_CASES = ("tf-json", "v2-json", "tf-grpc", "v2-grpc")
"""``--profile-case`` choices, in the order of the cases after the floor."""


def floor_app(model_file: Path) -> App:
    """The least a Python endpoint can do: parse, run onnxruntime inline, write."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    headers = [(b"content-type", b"application/json")]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = (await receive())["body"]
        x = np.asarray(orjson.loads(body)["instances"], dtype=np.float32)
        y = session.run(None, {name: x})[0]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send(
            {
                "type": "http.response.body",
                "body": orjson.dumps({"predictions": y}, option=orjson.OPT_SERIALIZE_NUMPY),
            }
        )

    return app


def rest(app: App, path: str, body: bytes) -> Request:
    async def request() -> bool:
        return await one(app, path, body) == 200

    return request


def grpc_call(method: Callable[[Any, Any], Awaitable[Any]], message: type[Any], raw: bytes) -> Request:
    """A servicer's call on a message parsed from ``raw``, its answer serialized."""

    async def request() -> bool:
        reply = await method(message.FromString(raw), CallContext())
        return bool(reply.SerializeToString())

    return request


async def one(app: App, path: str, body: bytes) -> int:
    """One request through ``app``; its status."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    # the head's size, as inferd's connection counts it while parsing (and hands it over)
    head_bytes = len(path) + sum(len(name) + len(value) for name, value in headers)
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "extensions": {WATCH: RequestWatch(head_bytes=head_bytes)},
    }
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never hangs up
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return int(sent[0]["status"])


async def cpu_per_request(request: Request, requests: int, concurrency: int) -> float:
    """CPU seconds per request over ``requests`` requests from ``concurrency`` tasks."""

    async def worker(n: int) -> None:
        for _ in range(n):
            await request()
            # A served request turns the event loop at least once; without a turn, the requests'
            # cancelled timers would wait for their handles' close callbacks, pile up and be
            # scanned by the cyclic garbage collector, which a server never sees.
            await asyncio.sleep(0)

    started = time.process_time()
    await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    return (time.process_time() - started) / (requests // concurrency * concurrency)


async def fastest(request: Request, requests: int, rounds: int, concurrency: int) -> float:
    """The least CPU seconds per request of ``rounds`` runs of ``requests``, after a warm-up."""
    await cpu_per_request(request, max(requests // 10, concurrency), concurrency)
    return min([await cpu_per_request(request, requests, concurrency) for _ in range(rounds)])


async def measure(
    requests: int, rounds: int, profile: Path | None, profile_case: str = "tf-json"
) -> list[tuple[str, int, float]]:
    work = Path(tempfile.mkdtemp(prefix="inferd-request-cost-"))
    model_file = models.build_all(work)["digits"]
    x = models.instances("digits", 1)
    tf_body = json.dumps({"instances": x.tolist()}).encode()
    v2_body = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
            ]
        }
    ).encode()
    server = Server(
        ServerConfig(repository=str(work), rest_api_port=0, port=0, file_system_poll_wait_seconds=0)
    )
    await server.control.sync()
    inferd = server.http_app()
    limits = RequestLimits.of(server.config)
    predict = tfserving_grpc.PredictionServicer(server.service, server.config.max_request_bytes, limits)
    infer = v2_grpc.InferenceServicer(server.service, server.control, limits)
    cases: list[tuple[str, Request]] = [
        ("floor (orjson, numpy, onnxruntime)", rest(floor_app(model_file), "/", tf_body)),
        ("inferd, TF Serving JSON", rest(inferd, "/v1/models/digits:predict", tf_body)),
        ("inferd, V2 JSON", rest(inferd, "/v2/models/digits/infer", v2_body)),
        ("inferd, TF Serving gRPC servicer", grpc_call(predict.Predict, *tf_predict(x))),
        ("inferd, V2 gRPC servicer", grpc_call(infer.ModelInfer, *v2_infer(x))),
    ]
    rows = []
    for name, request in cases:
        if not await request():
            raise SystemExit(f"{name}: not answered")
        for concurrency in CONCURRENCY:
            best = await fastest(request, requests, rounds, concurrency)
            rows.append((name, concurrency, best))
            print(f"{name:38s} c={concurrency:<3d} {best * 1e6:7.1f} us CPU per request", flush=True)
    if profile is not None:
        profiler = cProfile.Profile()
        profiler.enable()
        await cpu_per_request(cases[1 + PROFILE_CASES.index(profile_case)][1], requests, 1)
        profiler.disable()
        profiler.dump_stats(str(profile))
    await server.close()
    return rows


def tf_predict(x: np.ndarray) -> tuple[type[Any], bytes]:
    """TF Serving's PredictRequest for ``x``, in ``tensor_content`` (what ``inferd bench`` sends)."""
    request = prediction_service_pb2.PredictRequest()
    request.model_spec.name = "digits"
    encode_tensor(request.inputs["input"], x.astype(np.float32))
    return prediction_service_pb2.PredictRequest, request.SerializeToString()


def v2_infer(x: np.ndarray) -> tuple[type[Any], bytes]:
    """V2's ModelInferRequest for ``x``, in raw bytes (what tritonclient sends)."""
    request = grpc_service_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype(np.float32).tobytes())
    return grpc_service_pb2.ModelInferRequest, request.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per run (default 20,000)")
    parser.add_argument("--rounds", type=int, default=5, help="runs per case; the fastest counts (default 5)")
    parser.add_argument("--profile", type=Path, help="write a cProfile of one case's c=1 loop here")
    parser.add_argument(
        "--profile-case", choices=PROFILE_CASES, default="tf-json", help="the case --profile profiles"
    )
    args = parser.parse_args()
    uvloop.run(measure(args.requests, args.rounds, args.profile, args.profile_case))


if __name__ == "__main__":
    main()
