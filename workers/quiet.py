"""TensorFlow's start-up chatter kept off the terminal; everything else it writes still shows.

TensorFlow 2.16+ (and jaxlib) log through absl before absl is initialised, and those lines ignore
``TF_CPP_MIN_LOG_LEVEL`` ("WARNING: All log messages before absl::InitializeLog() is called ...",
oneDNN notes, "Could not find cuda drivers", a failed ``cuInit`` on a machine without a GPU; see
abseil-cpp PR 1957). So the import and the first device query run with file descriptor 2 pointed at a
temporary file, and afterwards every line that is not such chatter is written back to stderr: Python
warnings and real errors still show. ``BATCHINFER_VERBOSE=1`` (``--verbose``) shows everything.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

VERBOSE_ENV = "BATCHINFER_VERBOSE"

CHATTER = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] "  # absl INFO and WARNING lines
    r"|E\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] .*(cuInit|Unable to register cu|cuda_dlopen|computation placer)"
    r"|To enable the following instructions: .*rebuild TensorFlow)"  # the second line of cpu_feature_guard's note
)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def filter_chatter(text: str) -> str:
    """``text`` without TensorFlow's start-up lines."""
    return "".join(line for line in text.splitlines(keepends=True) if not CHATTER.match(line))


@contextlib.contextmanager
def quiet_startup() -> Iterator[None]:
    """Run the block with native stderr captured, then write back what is not start-up chatter."""
    if verbose():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        yield
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # after start-up: warnings and errors, no INFO
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                captured.seek(0)
                kept = filter_chatter(captured.read().decode("utf-8", errors="replace"))
                if kept:
                    sys.stderr.write(kept)
                    sys.stderr.flush()
    finally:
        os.close(saved)
