"""`python -m chimein.cli`: the `chimein` command."""

from chimein.cli import app

app()
