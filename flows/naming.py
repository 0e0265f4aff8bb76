"""Flow run names: what a run does (e.g. `tiny-chatml--offline-300--2026-11-01`), unless a person
named it.

Prefect gives every flow run a name before it starts: the one typed into the run form, or a
generated adjective-animal pair (`crazy-koala`, from the server or the form's own generator). A
flow's `flow_run_name` then replaces it, typed or not, so `typed_name_or` keeps a name that is not
such a pair and names the rest after what they do.
"""

from __future__ import annotations

import re

GENERATED = re.compile(r"[a-z]+-[a-z]+")  # Prefect's names (coolname's generate_slug(2)) and the form's


def typed_name_or(computed: str) -> str:
    """The current flow run's name if a person gave it one, else `computed`."""
    from prefect.runtime import flow_run

    name = flow_run.name
    return name if name and not GENERATED.fullmatch(name) else computed
