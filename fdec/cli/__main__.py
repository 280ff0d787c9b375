"""`python -m fdec.cli`: the `fdec` program."""

from fdec.cli import main

__all__: list[str] = []

main()
