"""Mapped copies of ONNX models whose weights are inside their ``.onnx`` file.

With ``[onnx] share_weights = true`` onnxruntime computes from a read-only mapping of a model's
external data, so a load maps a file and a close unmaps it. Weights inside the ``.onnx`` file are
instead parsed and copied at every load, and freed at every close, under the GIL. For such a
model (a file of at least ``MIN_FILE_BYTES``) the first load has onnxruntime save the model with
every initializer of 1 KiB or more as external data (``WEIGHTS``), at most at the basic graph
optimization level (which rewrites with standard ONNX operators only, for every provider), into
``<model cache>/derived/onnx-mapped/<key>/``; that load and the next ones build the session from
the copy.

An entry is keyed by the model file's resolved path and records the size and mtime of every file
in its folder (external data included) and the onnxruntime version it was written with
(``SOURCE``); a copy that no longer matches is written again. Entries are written in a scratch
folder and renamed into place, so a reader sees a whole entry or none. Writers hold the folder's
lock file, so processes sharing it (``--workers``) write an entry once: the others wait and map
that copy. Writing an entry removes those whose model file is gone or changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inferd.model_cache import locked

MIN_FILE_BYTES = 1 << 20
"""The smallest ``.onnx`` file copied: below it, parsing costs about what mapping does."""

FOLDER = "onnx-mapped"
"""The entries' folder under the model cache's ``derived`` folder."""

MODEL = "model.onnx"
WEIGHTS = "weights.bin"
SOURCE = "source.json"


def copy_of(model: Path, cache: Path) -> Path | None:
    """The mapped copy's ``model.onnx`` for ``model`` as it is now, if one was written; else
    None. ``cache`` is the ``derived`` folder of the model cache."""
    entry = _entry(model, cache)
    try:
        if json.loads((entry / SOURCE).read_text()) == _source(model):
            return entry / MODEL
    except (OSError, ValueError):
        pass
    return None


def write_copy(ort: Any, model: Path, cache: Path, level: Any, build: Callable[[str, Any], Any]) -> Path:
    """Have onnxruntime (module ``ort``) save ``model`` with its weights as external data,
    optimized at graph level ``level``, and return the copy's ``model.onnx``. ``build(path,
    session_options)`` builds a session (on the CPU) and saves it as the options say.

    Raises:
        OSError: the cache folder cannot be written.
        Exception: onnxruntime's own errors (it could not load or save the model).
    """
    root = cache / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    with locked(root):
        written = copy_of(model, cache)
        if written is not None:  # another process wrote it while this one waited
            return written
        _prune(root)
        source = _source(model)
        scratch = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            options = ort.SessionOptions()
            options.graph_optimization_level = level
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            options.optimized_model_filepath = str(scratch / MODEL)
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", WEIGHTS
            )
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
            )
            options.add_session_config_entry("session.disable_prepacking", "1")
            build(str(model), options)
            (scratch / SOURCE).write_text(json.dumps(source))
            entry = _entry(model, cache)
            shutil.rmtree(entry, ignore_errors=True)  # a stale copy
            scratch.rename(entry)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return entry / MODEL


def forget(model: Path, cache: Path) -> None:
    """Remove ``model``'s copy (one onnxruntime could not load)."""
    root = cache / FOLDER
    if root.is_dir():
        with locked(root):
            shutil.rmtree(_entry(model, cache), ignore_errors=True)


def _entry(model: Path, cache: Path) -> Path:
    key = hashlib.blake2b(str(model.resolve()).encode(), digest_size=12).hexdigest()
    return cache / FOLDER / key


def _source(model: Path) -> dict[str, Any]:
    """What a copy of ``model`` was made from. Raises OSError when ``model`` cannot be read."""
    import onnxruntime

    model.stat()  # the model itself must be there
    files = {}
    for path in sorted(model.parent.iterdir()):
        if path.is_file():
            stat = path.stat()
            files[path.name] = [stat.st_size, stat.st_mtime_ns]
    return {"path": str(model.resolve()), "files": files, "onnxruntime": onnxruntime.__version__}


SCRATCH_TTL_S = 3600.0
"""Age past which a scratch folder is taken for one a crashed writer left behind."""


def _prune(root: Path) -> None:
    """Remove the entries whose model file is gone or changed, and old scratch folders."""
    for entry in root.iterdir():
        if not entry.is_dir():  # the lock file
            continue
        if entry.name.startswith(".tmp-"):  # maybe another process's copy being written
            try:
                if time.time() - entry.stat().st_mtime > SCRATCH_TTL_S:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                pass
            continue
        try:
            recorded = json.loads((entry / SOURCE).read_text())
            stale = recorded != _source(Path(recorded["path"]))
        except (OSError, ValueError, KeyError, TypeError):
            stale = True
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
