import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from inferd.errors import InvalidArgument
from inferd.manager import ModelManager
from inferd.metrics import Metrics
from inferd.repository import ModelPlan, VersionSource
from inferd.servable import Servable, ServableFactory
from inferd.service import InferenceService, conform, conform_inputs
from inferd.threads import ThreadPool
from inferd.types import ModelRef, Signature, TensorSpec

F32 = TensorSpec("x", np.dtype(np.float32), (-1, 2))
I8 = TensorSpec("n", np.dtype(np.int8), (-1,))
TEXT = TensorSpec("s", np.dtype(object), (-1,))


def test_ints_are_accepted_as_floats_and_cast() -> None:
    out = conform(F32, np.array([[1, 2], [3, 4]]))
    assert out.dtype == np.float32
    assert out.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    # infinities and NaN sent as such stay what they are
    out = conform(F32, np.array([[np.inf, -np.inf], [np.nan, 1.0]]))
    assert np.isinf(out[0]).all()
    assert np.isnan(out[1, 0])


@pytest.mark.parametrize(
    ("spec", "value", "message"),
    [
        (F32, np.array([["a", "b"]]), "input 'x': expected FP32 [-1, 2], got BYTES [1, 2]"),
        (F32, np.array([[1.0, 2.0, 3.0]]), "input 'x': expected FP32 [-1, 2], got FP64 [1, 3]"),
        (F32, np.array([1.0, 2.0]), "input 'x': expected FP32 [-1, 2], got FP64 [2]"),
        (I8, np.array([1.5]), "input 'n': expected INT8 [-1], got FP64 [1]"),
        (I8, np.array([1, 300]), "value 300 is out of range for INT8 [-128, 127]"),
        # a finite number of another declared dtype (V2 FP64, TF Serving gRPC DT_DOUBLE) past FP32
        # would become an infinity: Triton and TF Serving refuse such a tensor outright
        (F32, np.array([[1.0, 1e300]]), "input 'x': datatype FP32 cannot hold 1e+300 (largest: 3.4"),
        (F32, np.array([[-1e39, 0.0]]), "input 'x': datatype FP32 cannot hold -1e+39"),
        (TEXT, np.array([1, 2]), "input 's': expected BYTES [-1], got INT64 [2]"),
        (TEXT, np.array([b"a", None], dtype=object), "expected strings"),
    ],
)
def test_values_the_signature_cannot_take_are_refused_with_a_precise_message(
    spec: TensorSpec, value: np.ndarray, message: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        conform(spec, value)
    assert message in err.value.message


def test_strings_become_object_arrays() -> None:
    out = conform(TEXT, np.array(["a", "bc"]))
    assert out.dtype == object
    assert out.tolist() == ["a", "bc"]


def test_missing_and_unexpected_inputs_are_named() -> None:
    signature = Signature("serving_default", (F32, I8), ())
    with pytest.raises(InvalidArgument) as err:
        conform_inputs(signature, {"x": np.zeros((1, 2)), "z": np.zeros(1)})
    assert "missing ['n'], unexpected ['z']" in err.value.message


def test_a_call_holds_one_lease_and_records_status_and_timing_when_it_ends(tmp_path: Path) -> None:
    from tests.unit.test_servable import Loads

    metrics = Metrics()

    async def calls() -> None:
        with ThreadPoolExecutor(1) as pool:
            factory = ServableFactory(ThreadPool(1, "infer"), load=Loads())
            manager: ModelManager[Servable] = ModelManager(pool, factory.load)
            await manager.apply([ModelPlan("m", {1: VersionSource(1, tmp_path, "f")})])
            service = InferenceService(manager, metrics)
            with service.call("v2_rest", "m") as call:
                signature = call.open(ModelRef("m"))
                call.open(ModelRef("m"))  # the same version: still one lease
                assert manager.leases() == 1
                answer = await call.infer({"x": np.ones((2, 2), np.float32)})
                assert manager.leases() == 1
            assert signature.input_names() == ["x"]
            np.testing.assert_allclose(answer.outputs["y"], [2.0, 2.0])
            assert manager.leases() == 0
            with pytest.raises(InvalidArgument), service.call("v2_rest", "m") as call:
                call.open(ModelRef("m"), "no_such_signature")
            assert manager.leases() == 0
            await manager.close()

    asyncio.run(calls())
    page = metrics.exposition().decode()
    assert 'inferd_requests_total{model="m",protocol="v2_rest",status="OK",version="1"} 1.0' in page
    assert (
        'inferd_requests_total{model="m",protocol="v2_rest",status="INVALID_ARGUMENT",version=""} 1.0' in page
    )
    total = (
        'inferd_request_duration_seconds_count{model="m",protocol="v2_rest",stage="total",version="1"} 1.0'
    )
    assert total in page
    assert "inferd_in_flight_requests 0.0" in page
