"""Where chimein keeps things: its configuration, its store and cache, and where it publishes
(`local` or `hub:ORG/NAME`)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import StringConstraints

_PACKAGE = Path(__file__).resolve().parent

# Where a dataset version or an adapter is published: `local` (the store) or `hub:ORG/NAME`.
# As a pydantic field type the Prefect form shows the pattern and refuses anything else.
PUBLISH_PATTERN = r"^(local|hub:[\w.-]+/[\w.-]+)$"
PublishTarget = Annotated[str, StringConstraints(pattern=PUBLISH_PATTERN)]


def hub_repo(target: str) -> str | None:
    """ORG/NAME of a `hub:ORG/NAME` publish target, None for `local`."""
    if not re.fullmatch(PUBLISH_PATTERN, target):
        raise ValueError(f"publish target {target!r}: use 'local' or 'hub:ORG/NAME'")
    return None if target == "local" else target.removeprefix("hub:")


def conf_dir() -> Path:
    """conf/ of the source checkout; an installed wheel carries a copy inside the package."""
    checkout = _PACKAGE.parent / "conf"
    return checkout if checkout.is_dir() else _PACKAGE / "conf"


DEFAULT_TRAIN_CONFIG = "defaults"  # the name of no file: the method's own settings (TrainConfig's defaults)
CPU_TRAIN_CONFIG = "offline-cpu"  # conf/train/offline-cpu.yaml: the flows' default, what a CPU host trains


def train_config_path(name_or_path: str | None) -> str | None:
    """conf/train/NAME.yaml for a name, a YAML path as it is; None or "defaults" (the method's
    defaults) is None."""
    if name_or_path in (None, DEFAULT_TRAIN_CONFIG) or Path(name_or_path).suffix in (".yaml", ".yml"):
        return None if name_or_path == DEFAULT_TRAIN_CONFIG else name_or_path
    return str(conf_dir() / "train" / f"{name_or_path}.yaml")


def list_train_configs() -> list[str]:
    """The names a training config can be chosen by: "defaults", then conf/train/*.yaml."""
    return [DEFAULT_TRAIN_CONFIG, *sorted(p.stem for p in (conf_dir() / "train").glob("*.yaml"))]


def store_dir() -> Path:
    """CHIMEIN_STORE, else ./store: where local datasets and adapters are kept."""
    return Path(os.environ.get("CHIMEIN_STORE", "store"))


def cache_dir() -> Path:
    """CHIMEIN_CACHE, else the user cache directory (e.g. ~/.cache/chimein)."""
    from platformdirs import user_cache_dir

    return Path(os.environ.get("CHIMEIN_CACHE") or user_cache_dir("chimein"))


def sample_data() -> Path:
    """A small sample of the curated corpus (its first part), for quick runs."""
    return _PACKAGE / "data" / "corpus" / "part-0.jsonl"
