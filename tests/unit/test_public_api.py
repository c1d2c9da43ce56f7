import subprocess
import sys

import inferd


def test_public_names_are_exactly_the_documented_list() -> None:
    assert sorted(inferd.__all__) == [
        "ErrorCode",
        "InferdError",
        "InferenceRequest",
        "InferenceResponse",
        "ModelId",
        "ModelRef",
        "Signature",
        "TensorSpec",
        "VersionState",
    ]
    for name in inferd.__all__:
        assert getattr(inferd, name) is not None


def test_import_inferd_loads_no_framework_or_web_server() -> None:
    code = (
        "import sys, inferd, inferd.service, inferd.manager, inferd.runtimes; "
        "heavy = {'onnxruntime', 'sklearn', 'skops', 'uvicorn', 'torch', 'tensorflow', 'keras', "
        "'xgboost', 'lightgbm', 'ai_edge_litert'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
