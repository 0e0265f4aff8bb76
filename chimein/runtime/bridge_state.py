"""What the Matrix bridge (chimein.runtime.matrix) keeps across restarts: a JSON file readable by
its owner only."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

HANDLED_KEPT = 2000  # event ids remembered as handled (a sync never holds more than this)


@dataclass
class BridgeState:
    """What the bridge keeps across restarts (a JSON file, readable by its owner only): its login,
    the sync token, the events it handled, and each room's settings."""

    user_id: str = ""
    device_id: str = ""
    access_token: str = ""
    next_batch: str | None = None
    handled: list[str] = field(default_factory=list)
    rooms: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> BridgeState:
        if not path.exists():
            return cls()
        try:
            raw = json.loads(path.read_text())
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
        except (ValueError, TypeError) as e:
            raise ValueError(f"the bridge's state file {path} is not readable ({e}); move it away to start "
                             "afresh (the bridge then logs in again and reads the rooms' backlog)") from None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self) | {"handled": self.handled[-HANDLED_KEPT:]}, f)
        os.replace(tmp, path)
