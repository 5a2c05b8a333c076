"""Keep TensorFlow, absl and tf2onnx quiet while a policy loads; our own messages still show.

Left alone, a first load prints about twenty lines a user can do nothing about: C++ notices
written before absl's logging is initialised (TF_CPP_MIN_LOG_LEVEL does not reach them),
TensorFlow's Python warnings about reference variables and deprecated v1 APIs, and
tf2onnx's progress notes.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_FRAMEWORK_LOGGERS = ("tensorflow", "absl", "tf2onnx", "onnx", "h5py")
# absl's format (I0000 00:00:1700000000.000000  123 port.cc:153] ...) and its preamble.
_NATIVE_NOTICE = re.compile(
    r"[IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\]"
    r"|WARNING: All log messages before absl::InitializeLog"
    r"|To enable the following instructions:"
)
_FRAMEWORK_MODULES = r"(tensorflow|tf_keras|keras|tf2onnx|onnx|absl|google\.protobuf)(\.|$)"


def quiet_framework_loggers() -> None:
    """Only their errors get through; idempotent."""
    for name in _FRAMEWORK_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def quiet_frameworks() -> Iterator[None]:
    """Around TensorFlow and tf2onnx calls: their Python warnings and notices are dropped."""
    quiet_framework_loggers()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=_FRAMEWORK_MODULES)
        # v1 APIs warn from inside TensorFlow but name the caller's frame.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


@contextmanager
def native_notices_dropped() -> Iterator[None]:
    """Send file descriptor 2 to a temporary file, then pass on what is not a native notice.

    For the import of TensorFlow, whose C++ start-up notices bypass every log setting. Any
    other line written meanwhile (another thread's log) is written out afterwards; if the
    block raises, everything is.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines = sink.read().decode(errors="replace").splitlines(keepends=True)
            kept = [line for line in lines if failed or not _NATIVE_NOTICE.match(line)]
            sys.stderr.write("".join(kept))
