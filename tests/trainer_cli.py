"""What the tests of train.py's command line share: the tiny CPU run, the environment of a child process, a
hostile pickle, and the check that an error is one line."""
from __future__ import annotations

import os
from pathlib import Path

TINY = ["--n-filters", "4", "--patch", "16", "16", "16", "--labeled", "2", "--no-compile", "--device", "cpu",
        "--log-every", "2", "--save-every", "2", "--eval-stride-xy", "16", "--eval-stride-z", "16", "--iterations", "2"]
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}


class Payload:
    """Unpickling this runs ``touch MARKER``: what a hostile checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def one_error_line(capsys, *words, prefix: str = "train.py: error: ") -> str:
    """stderr so far is one line starting with ``prefix``, no traceback, holding every one of ``words``."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(prefix) and "Traceback" not in err, err
    assert all(w in err for w in words), err
    return err
