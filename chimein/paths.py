"""Where chimein keeps its configuration and its cache."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def conf_dir() -> Path:
    """conf/ of the source checkout; an installed wheel carries a copy inside the package."""
    checkout = _PACKAGE.parent / "conf"
    return checkout if checkout.is_dir() else _PACKAGE / "conf"


def train_config_path(name_or_path: str | None) -> str | None:
    """conf/train/NAME.yaml for a name, a YAML path as it is; None (the method's defaults) stays None."""
    if name_or_path is None or Path(name_or_path).suffix in (".yaml", ".yml"):
        return name_or_path
    return str(conf_dir() / "train" / f"{name_or_path}.yaml")


def cache_dir() -> Path:
    """CHIMEIN_CACHE, else the user cache directory (e.g. ~/.cache/chimein)."""
    from platformdirs import user_cache_dir

    return Path(os.environ.get("CHIMEIN_CACHE") or user_cache_dir("chimein"))


def sample_data() -> Path:
    """A small sample of the curated corpus (its first part), for quick runs."""
    return _PACKAGE / "data" / "corpus" / "part-0.jsonl"
