"""Keeping TensorFlow's C++ log lines off ``inferd optimize``'s terminal.

TensorFlow, its converters and the TFLite interpreter log from C++ straight to file descriptor 2
(``I0000 00:00:... loader.cc:236] Restoring SavedModel bundle.``), dozens of lines per variant.
``TF_CPP_MIN_LOG_LEVEL`` (read when TensorFlow is first imported) drops most of them, but not the
lines written before absl's logging is set up, nor TFLite's own. So, while a variant is made,
descriptor 2 is captured: TensorFlow's lines go to the ``inferd.optimize`` logger at DEBUG
(``--log_level debug`` shows them), and anything else is written back to stderr unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

_TF_LINE = re.compile(
    r"^(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.]+:\d+\]"  # absl / TF C++: I0000 00:00:1.2 7 port.cc:153]
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|INFO: Created TensorFlow Lite"  # TFLite's own logger
    r"|To enable the following instructions: .* rebuild TensorFlow)"  # cpu_feature_guard's second line
)


def quiet_tensorflow(debug: bool) -> None:
    """Ask TensorFlow's C++ code for errors only (unless ``debug``), if the user did not choose a
    level; takes effect only when called before TensorFlow is first imported."""
    if not debug:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def native_logs_to(log: logging.Logger) -> Iterator[None]:
    """While inside, capture what is written to file descriptor 2; on exit, send TensorFlow's
    log lines to ``log`` at DEBUG and write the rest back to stderr. Not for concurrent use:
    descriptor 2 is the process's."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace")
    kept = []
    for line in text.splitlines():
        if _TF_LINE.match(line):
            log.debug("%s", line)
        else:
            kept.append(line)
    if kept:
        sys.stderr.write("\n".join(kept) + "\n")
        sys.stderr.flush()
