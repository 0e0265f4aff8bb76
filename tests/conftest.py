"""Shared fixtures: tiny presets of every family with their real tokenizers (offline assets), and
where the test data lies.

    unit/<package>/   one folder per subpackage of chimein (no server; tiny models, local fakes)
    integration/      everything that starts a real server on loopback (marked `integration`)
    fakes/            stand-ins of paid or hosted APIs (OpenAI, Replicate, the Hub) at the HTTP layer
    fixtures/         small data files
"""

from __future__ import annotations

import functools
import os
import signal
from pathlib import Path

import pytest

from chimein.models.assets import build_asset
from chimein.models.loading import load_tokenizer
from chimein.presets import load_preset

# A shell that starts the tests in the background (`make test &`, nohup) ignores SIGINT, and the
# ignoring is inherited: the Ctrl-C tests would then see no KeyboardInterrupt, nor would the
# programs they start and interrupt. Python's own handler is put back (exec'd children then get
# the default disposition again).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"  # small data files made for the tests
TINY = ["tiny-zephyr", "tiny-llama-2", "tiny-openchat", "tiny-chatml"]


@functools.cache
def preset_and_tokenizer(name: str):
    preset = load_preset(name)
    build_asset(preset.asset)  # cached after the first build (`make test` builds all up front)
    return preset, load_tokenizer(preset)


@pytest.fixture(params=TINY)
def family(request):
    """(preset, tokenizer) for each model family."""
    return preset_and_tokenizer(request.param)


@pytest.fixture(autouse=True)
def _tracking_uri_stays_with_its_test():
    """mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI in the environment; without this, a
    test's store would leak into every later test of the session."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
