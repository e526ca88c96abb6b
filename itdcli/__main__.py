"""`python -m itdcli`, the same as the `itd` console script."""

from itdcli.cli.entry import run

if __name__ == "__main__":
    run()
