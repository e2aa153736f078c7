"""``python -m whylook``: the ``whylook`` program."""

from whylook.cli import program

raise SystemExit(program())
