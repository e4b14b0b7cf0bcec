"""`python -m dominator.cli`: the `dominator` program."""

from dominator.cli.main import main

main()
