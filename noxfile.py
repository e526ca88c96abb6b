"""Developer sessions: `nox` runs the tests; `nox -s lint typecheck docs` run the other checks."""

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, as CI runs it."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "itdcli", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "itdcli", "tests", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package."""
    session.install("-e", ".[dev]")
    session.run("mypy", "--strict", "itdcli")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the MkDocs site with --strict."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: each prints a table and writes JSON under benchmarks/out/."""
    session.install("-e", ".")
    session.run("python", "benchmarks/batch.py")
    session.run("python", "benchmarks/nll.py")
    session.run("python", "benchmarks/selection_bias.py")
    session.run("python", "benchmarks/throughput.py")
    session.run("python", "benchmarks/precision.py")
    session.run("python", "benchmarks/efficiency.py")
    session.run("python", "benchmarks/noise_floor.py")
    session.run("python", "benchmarks/rounds.py")
    session.run("python", "benchmarks/curve_control.py")
    session.run("python", "benchmarks/vlb.py")
