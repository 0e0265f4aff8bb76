"""Everything here starts a real server on loopback (Prefect, MLflow, uvicorn, PostgreSQL, torchrun's
rendezvous), started and stopped by the tests: marked `integration` here, so `pytest -m "not
integration"` leaves them out. Stand-ins of paid APIs (tests/fakes/) do not make a test one."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)
