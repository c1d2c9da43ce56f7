"""``inferd batch`` with object-store URIs (``s3://``, ``gs://``, ``az://``): the model and the
input are copied into a local scratch folder before the job, the output and the rejects are
written there and uploaded when the job has finished (a failed job uploads nothing). Local paths
pass through unchanged. The scratch folder is removed at the end, so ``--resume`` continues only
jobs whose OUTPUT is local. A URI whose scheme is not an object store is refused (``ConfigError``).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from inferd.config import model_location
from inferd.errors import InvalidArgument
from inferd.storage import ObjectStore, StorageError, materialize


@dataclass(slots=True)
class Staged:
    """Local stand-ins for a job's paths; ``publish`` uploads the outputs that are remote."""

    model: Path
    input: str
    output: Path
    rejects: Path | None
    scratch: Path | None = None
    uploads: list[tuple[Path, str]] = field(default_factory=list)

    def close(self) -> None:
        """Remove the scratch folder and what was staged in it."""
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def publish(self) -> None:
        """Upload every local output that has a remote destination and was written.

        Raises:
            InvalidArgument: an upload failed; the message names the URI and the cause.
        """
        for local, uri in self.uploads:
            if local.exists():
                try:
                    ObjectStore(uri).upload_file(local, uri)
                except StorageError as exc:
                    raise InvalidArgument(f"OUTPUT: {exc}") from exc


def _model(uri: str, model_name: str | None, version: int | None, scratch: Path) -> Path:
    """Copy what the job needs of the model at ``uri``: with ``model_name``, that model's
    folder; otherwise, when ``uri`` holds numbered version folders, only the chosen version
    (``version`` or the latest) and the files beside the versions (``inferd.toml``)."""
    base = f"{uri}/{model_name}" if model_name else uri
    store = ObjectStore(base)
    listing = store.list_tree(base)
    if not listing:
        raise StorageError(f"nothing found under {base}")
    numbers = {int(k.split("/", 1)[0]) for k in listing if "/" in k and k.split("/", 1)[0].isdigit()}
    if numbers:
        chosen = version if version is not None and version in numbers else max(numbers)
        keys = [k for k in listing if "/" not in k or k.split("/", 1)[0] == str(chosen)]
    else:
        keys = list(listing)
    name = base.rsplit("/", 1)[-1]
    store.download(base, sorted(keys), scratch / name)
    return scratch if model_name else scratch / name


def stage(
    model: str, input: str, output: str, rejects: str | None, model_name: str | None, version: int | None
) -> Staged:
    """Local paths for a job's MODEL, INPUT, OUTPUT and ``--rejects``, copying the remote
    ones into a scratch folder; the caller runs the job, calls ``publish``, then ``close``.

    Raises:
        InvalidArgument: a remote path cannot be read; the message names the argument.
    """
    places = [model_location(p) for p in (model, input, output, rejects or "")]
    if not any(isinstance(p, str) for p in places):
        return Staged(Path(model), input, Path(output), Path(rejects) if rejects else None)
    scratch = Path(tempfile.mkdtemp(prefix="inferd-batch-"))
    staged = Staged(Path(model), input, Path(output), Path(rejects) if rejects else None, scratch)
    try:
        _fill(staged, model, input, output, rejects, model_name, version)
    except BaseException:
        staged.close()
        raise
    return staged


def _fill(
    staged: Staged,
    model: str,
    input: str,
    output: str,
    rejects: str | None,
    model_name: str | None,
    version: int | None,
) -> None:
    assert staged.scratch is not None
    scratch = staged.scratch

    def local_output(where: str, what: str) -> Path:
        place = model_location(where)
        if isinstance(place, Path):
            return place
        path = scratch / what / place.rsplit("/", 1)[-1]
        path.parent.mkdir(parents=True, exist_ok=True)
        staged.uploads.append((path, place))
        return path

    place = model_location(model)
    if isinstance(place, str):
        try:
            staged.model = _model(place, model_name, version, scratch / "model")
        except StorageError as exc:
            raise InvalidArgument(f"MODEL: {exc}") from exc
    source = model_location(input)
    if isinstance(source, str):
        try:
            staged.input = str(materialize(source, scratch / "input"))
        except StorageError as exc:
            raise InvalidArgument(f"INPUT: {exc}") from exc
    staged.output = local_output(output, "output")
    staged.rejects = local_output(rejects, "rejects") if rejects else None
    remote_output = model_location(output)
    if staged.rejects is None and isinstance(remote_output, str):
        # the default rejects file sits beside OUTPUT, there and here
        staged.rejects = staged.output.with_name(staged.output.name + ".rejects.jsonl")
        staged.uploads.append((staged.rejects, f"{remote_output}.rejects.jsonl"))
