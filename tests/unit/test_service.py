import numpy as np
import pytest

from inferd.errors import InvalidArgument
from inferd.service import conform, conform_inputs
from inferd.types import Signature, TensorSpec

F32 = TensorSpec("x", np.dtype(np.float32), (-1, 2))
I8 = TensorSpec("n", np.dtype(np.int8), (-1,))
TEXT = TensorSpec("s", np.dtype(object), (-1,))


def test_ints_are_accepted_as_floats_and_cast() -> None:
    out = conform(F32, np.array([[1, 2], [3, 4]]))
    assert out.dtype == np.float32
    assert out.tolist() == [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.parametrize(
    ("spec", "value", "message"),
    [
        (F32, np.array([["a", "b"]]), "input 'x': expected FP32 [-1, 2], got BYTES [1, 2]"),
        (F32, np.array([[1.0, 2.0, 3.0]]), "input 'x': expected FP32 [-1, 2], got FP64 [1, 3]"),
        (F32, np.array([1.0, 2.0]), "input 'x': expected FP32 [-1, 2], got FP64 [2]"),
        (I8, np.array([1.5]), "input 'n': expected INT8 [-1], got FP64 [1]"),
        (I8, np.array([1, 300]), "value 300 is out of range for INT8 [-128, 127]"),
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
