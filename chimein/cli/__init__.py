"""The `chimein` command: one module per stage, each adding its commands to the one app.

    chimein --help
"""

from chimein.cli import data, importing, model, evaluation, knowledge, stack, bridge  # noqa: F401, I001 — they add their commands, in this order
from chimein.cli.common import app

__all__ = ["app"]
