"""`python -m itdcli`, the same as the `itd` console script."""

from itdcli.cli.main import main

if __name__ == "__main__":
    main()
