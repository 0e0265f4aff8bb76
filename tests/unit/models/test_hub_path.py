"""With no local asset, presets load from the Hub: the real download path, against a fake Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from chimein.models.assets import asset_dir
from tests.fakes.fake_hub import FakeHub

SCRIPT = """
import json, sys
from chimein.conversation import parse_conversation
from chimein.formatting import encode
from chimein.models.loading import load_tokenizer, model_source
from chimein.presets import load_preset
preset = load_preset("zephyr-7b-beta")
conv = parse_conversation([{"role": "user", "name": "Alice", "content": "who wrote Dune? </s>"},
                           {"role": "assistant", "content": "Frank Herbert."}])
ex = encode(conv, load_tokenizer(preset), preset)
print(json.dumps({"source": model_source(preset, need_weights=False), "ids": ex.input_ids,
                  "mask": ex.assistant_masks}))
"""


def test_zephyr_tokenizer_loads_from_the_hub_when_no_asset_is_built(tmp_path):
    repo = "HuggingFaceH4/zephyr-7b-beta"
    with FakeHub({repo: asset_dir("zephyr-tokenizer")}) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
               "CHIMEIN_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        env.pop("HF_HUB_OFFLINE", None)
        proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        via_hub = json.loads(proc.stdout.strip().splitlines()[-1])
        downloaded = {p.rsplit("/", 1)[-1] for m, p in hub.requests if m == "GET" and "/resolve/" in p}
    assert via_hub["source"] == repo
    assert "tokenizer.json" in downloaded
    # identical to the offline asset path, in this process
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    offline = json.loads(proc.stdout.strip().splitlines()[-1])
    assert offline["source"] == str(asset_dir("zephyr-tokenizer"))
    assert (via_hub["ids"], via_hub["mask"]) == (offline["ids"], offline["mask"])
