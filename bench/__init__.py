"""inferd's benchmark suite, run as modules from the repository root (``python -m bench.run``,
``python -m bench.protocols`` ...); see bench/README.md. It drives inferd from outside (processes,
wire protocols, ``inferd bench``) and shares the tests' process and model helpers
(``tests/inferd_process.py``, ``tests/models.py``)."""
