"""The console entry point: Ctrl-C while the CLI is still being imported exits 130 in one line, as at any other time."""

from __future__ import annotations

import os
import signal
import sys


def run() -> None:
    """Import the CLI with SIGINT turned into a quiet exit 130, then run it with Python's own handler back."""

    def early(signum: int, frame: object) -> None:
        sys.stderr.write("error: interrupted; no partial results were written\n")
        os._exit(130)  # nothing has been written yet: the imports are all that ran

    previous = signal.signal(signal.SIGINT, early)
    from itdcli.cli.main import main

    signal.signal(signal.SIGINT, previous)
    main()
