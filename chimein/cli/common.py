"""The `chimein` command's app and what its commands share: the consoles, help texts, failing with
one line, loading an assistant."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Train and run a group-chat assistant that knows when to chime in.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


console = Console()


err = Console(stderr=True)


PRESET_HELP = "Model preset: a name from `chimein presets` or a YAML path."


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(1)


def publish_target(target: str) -> str:
    """--publish, checked before any work: 'local' or 'hub:ORG/NAME'."""
    from chimein.paths import hub_repo

    try:
        hub_repo(target)
    except ValueError as e:
        fail(str(e))
    return target


def rejections_table(rejected, limit: int = 20, rest: str = "") -> Table:
    table = Table("line", "reason", title=f"rejected ({len(rejected)})")
    for r in rejected[:limit]:
        table.add_row(str(r.line), r.problem)
    if len(rejected) > limit:
        table.add_row("…", f"{len(rejected) - limit} more{rest}")
    return table


RESPONDER_HELP = ("Where replies come from when the assistant speaks: openai:MODEL (any OpenAI-compatible "
                  "endpoint, OPENAI_API_KEY). The local model still decides at every message, and "
                  "replies itself when the responder fails.")
RESPONDER_URL_HELP = "The responder's OpenAI-compatible base URL (vLLM, Ollama, llama.cpp); no key needed."


def responder_or_fail(spec: Optional[str], base_url: Optional[str]):
    """The responder of --responder / --responder-base-url, or exit with why not."""
    from chimein.runtime.responder import ResponderError, load_responder

    try:
        return load_responder(spec, base_url)
    except ResponderError as e:
        fail(str(e))


TOOLS_HELP = ("Answer conversions, clock times across zones, weekdays and arithmetic with a tool's exact "
              "result (pint, zoneinfo) instead of the model's guess.")
HEDGE_HELP = ("Say a reply the model is not sure of (below the adapter's calibrated confidence) as a "
              "guess when addressed, and stay silent when not; --no-hedge says every reply as it is.")
KNOWLEDGE_HELP = ("A folder of the group's documents (Markdown, text): indexed (`chimein knowledge build`), and "
                  "each message is shown with the passages it retrieves. Default: the folder the adapter was "
                  "trained for, if it names one; 'none': no documents.")
WITHDRAW_HELP = ("Not addressed and not sure: stay silent (default); --no-withdraw chimes in with the guess, "
                 "said as one (the model's decisions unchanged).")


def knowledge_arg(value: Optional[str], default="adapter"):
    """--knowledge: unset → `default` (from_adapter's: the adapter's own documents), 'none' → none."""
    if value is None:
        return default
    return None if value.lower() == "none" else Path(value)


def load_assistant(adapter: Optional[str], base: Optional[str], chattiness: Optional[float],
                   responder: Optional[str] = None, responder_base_url: Optional[str] = None,
                   tools: bool = True, hedge: bool = True, withdraw: bool = True,
                   knowledge: Optional[str] = None):
    import time

    from chimein.models.loading import quiet
    from chimein.runtime.assistant import BASELINE_PROMPT, GroupChatAssistant
    from chimein.runtime.state import DEFAULT_CHATTINESS

    if bool(adapter) == bool(base):
        fail("pass exactly one of --adapter REF (a trained adapter) or --base PRESET (the un-tuned "
              "base model with the method's instruction prompt)")
    start = time.perf_counter()
    try:  # quietly: loading prints progress bars and library warnings by the screenful
        with err.status("loading the model"), quiet():
            if adapter:
                bot = GroupChatAssistant.from_adapter(adapter, chattiness=chattiness, tools=tools, hedge=hedge,
                                                      withdraw=withdraw, knowledge=knowledge_arg(knowledge))
            else:
                bot = GroupChatAssistant.from_preset(base, chattiness=DEFAULT_CHATTINESS if chattiness is None else chattiness,
                                                     system_prompt=BASELINE_PROMPT, tools=tools, hedge=hedge,
                                                     withdraw=withdraw, knowledge=knowledge_arg(knowledge, None))
    except FileNotFoundError as e:  # no such adapter or preset asset, or no MLflow store for models:/…
        fail(str(e))
    except ValueError as e:  # KnowledgeError: a knowledge folder that cannot be indexed
        fail(str(e))
    bot.responder = responder_or_fail(responder, responder_base_url)
    console.print(f"loaded {bot.describe()} in {time.perf_counter() - start:.1f} s"
                  + (f"; replies from {bot.responder.name}" if bot.responder else ""), highlight=False,
                  soft_wrap=True)
    return bot


CHATTINESS_HELP = ("Speak when p_speak >= this. Default: the adapter's threshold, calibrated on its "
                   "dataset's validation split when it was trained (0.5 for --base).")
