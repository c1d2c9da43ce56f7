"""The seam between inferd and ML frameworks: ``Runtime`` and ``Model`` protocols, detection (``runtime``)."""

from inferd.runtimes.runtime import (
    Model,
    Runtime,
    Supervised,
    check_options,
    cuda_index,
    declared_specs,
    detect_runtime,
    find_model_file,
    get_runtime,
    import_framework,
    int_option,
    load_model,
    parse_signature,
    runtime_names,
)

__all__ = [
    "Model",
    "Runtime",
    "Supervised",
    "check_options",
    "cuda_index",
    "declared_specs",
    "detect_runtime",
    "find_model_file",
    "get_runtime",
    "import_framework",
    "int_option",
    "load_model",
    "parse_signature",
    "runtime_names",
]
