"""`chimein serve` keeps bounded memory: 300 conversations on a real server, RSS measured.

tiny-chatml has the real SmolLM2 tokenizer (a 49 152-token vocabulary), so the logits of one fed
chunk are big next to its KV cache (2 layers, hidden 64): memory that follows the logits shows.
"""

from __future__ import annotations

import httpx
import psutil

from chimein.runtime.assistant import GroupChatAssistant
from chimein.runtime.server import create_app
from tests.integration.test_server import running


def test_300_conversations_keep_rss_growth_under_300_mb():
    bot = GroupChatAssistant.from_preset("tiny-chatml", max_new_tokens=4, chattiness=2.0)
    process = psutil.Process()  # the server runs in a thread of this process
    with running(create_app(bot)) as url, httpx.Client(base_url=url) as client:  # default limits
        def talk(cid: str) -> None:
            r = client.post(f"/v1/conversations/{cid}/messages", json={"name": "Ana", "content": "hi"})
            assert r.status_code == 200, r.text

        for i in range(10):  # warm up allocators and lazy imports
            talk(f"warm-{i}")
        before = process.memory_info().rss
        for i in range(300):
            talk(f"c-{i}")
        growth = (process.memory_info().rss - before) / 2**20
        health = client.get("/healthz").json()
    assert growth < 300, f"RSS grew {growth:.0f} MB for 300 conversations"
    assert health["conversations"] == 256 and health["cache_mb"] < 100
