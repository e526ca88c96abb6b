"""The `itd` console entry point: the typer app and the one map from errors to exit codes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import typer
from typer.exceptions import TyperException

from itdcli.cli.curve import curve_command
from itdcli.cli.download import download_command
from itdcli.cli.ensemble import ensemble_command
from itdcli.cli.finetune import finetune_command
from itdcli.cli.nll import nll_command

app = typer.Typer(
    name="itd",
    help="Information-theoretic diffusion likelihoods: bits/dim, MMSE curves and per-image scores.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: wraps at the terminal's width and never cuts an option name
)


def _version(value: bool) -> None:
    """Print the version and stop (an eager option)."""
    if value:
        from itdcli import __version__

        typer.echo(f"itd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Information-theoretic diffusion likelihoods: bits/dim, MMSE curves and per-image scores."""


EXAMPLES = {  # shown under each command's help; "\b" keeps click from re-wrapping them
    "nll": ("itd nll digits_test --model digits", "itd nll cifar_test --discrete --model iddpm"),
    "curve": ("itd curve --out fig.pdf", "itd curve RUN_DIR --out fig.png --overwrite"),
    "download": ("itd download iddpm", "itd download cifar10 --dir ~/data"),
    "finetune": ("itd finetune --model ddpm", "itd finetune --init scratch --steps 200 --out run1"),
    "ensemble": ("itd ensemble digits_test --model digits --model gaussian",),
}
COMMANDS: dict[str, Callable[..., None]] = {
    "nll": nll_command,
    "curve": curve_command,
    "download": download_command,
    "finetune": finetune_command,
    "ensemble": ensemble_command,
}
SHORT = {
    "nll": "Bits/dim of data under a model, with standard errors.",
    "curve": "Draw the ε-MSE curves of runs against logSNR.",
    "download": "Fetch the pretrained models and CIFAR-10, verified.",
    "finetune": "Fine-tune or train a model with the ITD loss.",
    "ensemble": "Combine models per logSNR into one ensemble bound.",
}
for _name, _command in COMMANDS.items():
    app.command(
        _name, short_help=SHORT[_name], epilog="\b\nExamples:\n" + "\n".join(f"  {e}" for e in EXAMPLES[_name])
    )(_command)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int) -> None:
    """Print one error line on stderr and exit."""
    typer.echo(f"error: {message}", err=True)
    raise SystemExit(code)


def _validation_line(exc: Exception) -> str:
    """The first problem of a pydantic ValidationError as `--option: message`."""
    errors = exc.errors()  # type: ignore[attr-defined]
    first = errors[0]
    where = "--" + "-".join(str(p) for p in first["loc"]).replace("_", "-") if first["loc"] else "input"
    return f"invalid {where}: {first['msg']}"


def main(argv: list[str] | None = None) -> None:
    """Run the app; user errors exit 2 with one line, Ctrl-C exits 130, tracebacks only with ITD_DEBUG=1."""
    debug = os.environ.get("ITD_DEBUG") == "1"
    signalled = _watch_interrupts()
    try:
        code = app(args=argv, standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        _fail("interrupted; no partial results were written", EXIT_INTERRUPTED)
    except TyperException as exc:  # typer's usage errors: they print themselves, exit 2
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        code = EXIT_USAGE
    except Exception as exc:
        if debug:
            raise
        if signalled():  # Ctrl-C inside an import or a C extension can surface as another error (ImportError)
            _fail("interrupted; no partial results were written", EXIT_INTERRUPTED)
        _fail_known(exc)
    if code == EXIT_INTERRUPTED:  # typer turns KeyboardInterrupt into Exit(130)
        _fail("interrupted; no partial results were written", EXIT_INTERRUPTED)
    raise SystemExit(code if isinstance(code, int) else 0)


def _watch_interrupts() -> Callable[[], bool]:
    """Raise KeyboardInterrupt on SIGINT as Python does, remembering that it came; returns whether it has."""
    import signal
    import threading

    seen: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        return lambda: False

    def handle(signum: int, frame: object) -> None:
        seen.append(True)
        if _torch_initializing():  # an exception raised into torch's C++ start-up aborts the process (SIGABRT)
            sys.stderr.write("error: interrupted; no partial results were written\n")
            os._exit(EXIT_INTERRUPTED)  # only imports have run since the last check: nothing to clean up
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handle)
    return lambda: bool(seen)


def _torch_initializing() -> bool:
    """Whether a torch-family module (torch, torchvision, …) is being imported right now.

    Their C++ start-up calls back into Python; a KeyboardInterrupt raised there becomes a C++ `python_error`
    thrown where none may be, and the process dies by std::terminate (measured: 1 in 150 Ctrl-Cs during
    `import torch` on torch 2.14).
    """
    for name, module in list(sys.modules.items()):
        if name.startswith("torch") and getattr(getattr(module, "__spec__", None), "_initializing", False):
            return True
    return False


def _no_space(exc: BaseException) -> bool:
    """Whether a write failed for want of room (a full disk, a quota, a file-size limit), whatever raised it."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return True
    text = str(exc)
    return any(s in text for s in ("No space left", "File too large", "Disk quota", "os error 28", "os error 27"))


def _fail_known(exc: Exception) -> None:
    """Map an exception to its one-line message and exit code."""
    from pydantic import ValidationError

    from itdcli.errors import ItdError, ItdInterrupted, ItdOptionError

    if isinstance(exc, ItdOptionError):
        flag = "--" + exc.field.replace("_", "-") if exc.field != "options" else "options"
        _fail(f"invalid {flag}: {exc.problem}", EXIT_USAGE)
    if isinstance(exc, ItdInterrupted):
        _fail(str(exc), EXIT_INTERRUPTED)
    if isinstance(exc, ItdError):
        _fail(str(exc), EXIT_USAGE)
    if isinstance(exc, ValidationError):
        _fail(_validation_line(exc), EXIT_USAGE)
    if _no_space(exc):
        _fail(
            "not enough space to write the output (the disk, a quota or a file-size limit is full); nothing was "
            "replaced: free some space or choose another --out",
            EXIT_USAGE,
        )
    if isinstance(exc, PermissionError | FileNotFoundError | IsADirectoryError | NotADirectoryError):
        _fail(f"{exc.strerror or exc}: {exc.filename}", EXIT_USAGE)
    _fail(f"unexpected {type(exc).__name__}: {exc} (set ITD_DEBUG=1 for a traceback)", 1)


if __name__ == "__main__":
    main(sys.argv[1:])
