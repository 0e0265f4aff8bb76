"""`chimein bridge matrix`: the assistant in a chat platform's rooms (chimein.runtime.matrix)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from chimein.cli.common import (
    CHATTINESS_HELP,
    HEDGE_HELP,
    KNOWLEDGE_HELP,
    RESPONDER_HELP,
    RESPONDER_URL_HELP,
    TOOLS_HELP,
    WITHDRAW_HELP,
    app,
    console,
    fail,
    load_assistant,
)

bridge_app = typer.Typer(help="Put the assistant into a chat platform's rooms.", no_args_is_help=True)
app.add_typer(bridge_app, name="bridge")


def default_state(user: str) -> Path:
    from platformdirs import user_state_path

    return user_state_path("chimein") / "matrix" / (re.sub(r"[^A-Za-z0-9._-]+", "_", user.lstrip("@")) + ".json")


@bridge_app.command("matrix")
def matrix(
    homeserver: Annotated[str, typer.Option(help="The homeserver's URL, e.g. https://matrix.example.org.")],
    user: Annotated[str, typer.Option(help="The bot's account, e.g. @chimein:example.org. Its password comes "
                                           "from CHIMEIN_MATRIX_PASSWORD, or an access token from CHIMEIN_MATRIX_TOKEN.")],
    adapter: Annotated[Optional[str], typer.Option(help="Adapter: DIR, local:NAME, hub:ORG/NAME, models:/NAME@ALIAS.")] = None,
    base: Annotated[Optional[str], typer.Option(help="Or a preset's un-tuned base model.")] = None,
    chattiness: Annotated[Optional[float], typer.Option(help=CHATTINESS_HELP + " A room's /chimein quiet|chatty moves it.")] = None,
    knowledge: Annotated[Optional[str], typer.Option(help=KNOWLEDGE_HELP, metavar="PATH|none")] = None,
    state: Annotated[Optional[Path], typer.Option(help="Where the bridge keeps its login, sync token, handled events "
                                                       "and room settings (readable by you only). Default: the user "
                                                       "state folder, one file per account.")] = None,
    catch_up: Annotated[float, typer.Option(help="After a restart, answer missed messages at most this many seconds "
                                                 "old; older ones are only read.")] = 300,
    max_batch: Annotated[int, typer.Option(min=1, help="Most messages (of different rooms) decided together.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest reply, in tokens.")] = 96,
    device_name: Annotated[str, typer.Option(help="The device name of the bot's login.")] = "chimein",
    record_dir: Annotated[Optional[Path], typer.Option(help="Where rooms that said '/chimein record on' are recorded "
                                                            "(scrubbed of personal data), for the retrain flow's "
                                                            "feedback setting. Default: beside the state file.")] = None,
    retention_days: Annotated[float, typer.Option(min=0.1, help="Recordings older than this are deleted.")] = 30,
    responder: Annotated[Optional[str], typer.Option(help=RESPONDER_HELP)] = None,
    responder_base_url: Annotated[Optional[str], typer.Option(help=RESPONDER_URL_HELP)] = None,
    tools: Annotated[bool, typer.Option(help=TOOLS_HELP)] = True,
    hedge: Annotated[bool, typer.Option(help=HEDGE_HELP)] = True,
    withdraw: Annotated[bool, typer.Option(help=WITHDRAW_HELP)] = True,
) -> None:
    """Run the assistant as a Matrix bot: it joins the rooms it is invited to, reads every message,
    and replies when it decides to speak (in the thread, or as a rich reply; nobody pinged). Unencrypted
    rooms only. Ctrl-C stops it; a restart answers nothing twice."""
    import asyncio
    import logging
    import signal

    from chimein.runtime.matrix import MatrixBridge

    password, token = os.environ.get("CHIMEIN_MATRIX_PASSWORD"), os.environ.get("CHIMEIN_MATRIX_TOKEN")
    if not (password or token):
        fail("set CHIMEIN_MATRIX_PASSWORD (the bot account's password) or CHIMEIN_MATRIX_TOKEN (an access "
             "token) in the environment: secrets are never taken on the command line")
    if not re.fullmatch(r"@[^:\s]+:\S+", user):
        fail(f"--user {user!r} is not a Matrix user id: write it as @NAME:SERVER, e.g. @chimein:example.org")
    bot = load_assistant(adapter, base, chattiness, responder, responder_base_url, tools, hedge, withdraw, knowledge)
    bot.max_new_tokens = max_new_tokens
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("chimein.matrix").setLevel(logging.INFO)
    try:
        bridge = MatrixBridge(bot, homeserver, user, state or default_state(user), password=password, token=token,
                              device_name=device_name, catch_up_s=catch_up, max_batch=max_batch,
                              record_dir=record_dir, retention_days=retention_days)
    except ValueError as e:
        fail(str(e))
    console.print(f"bridging {user} on {homeserver}; state in {bridge.state_path}; recordings (rooms that "
                  f"agreed) in {bridge.recorder.root}", soft_wrap=True, highlight=False)

    async def main():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, bridge.stopping.set)
        await bridge.run()

    try:
        asyncio.run(main())
    except PermissionError as e:
        fail(str(e))
    s = bridge.stats
    console.print(f"stopped: {s['decided']} messages decided, {s['replied']} replies, {s['read']} read as context")
