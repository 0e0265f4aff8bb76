"""`chimein train|chat|serve`: train an adapter, chat with it, serve it over HTTP."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from chimein.cli.common import (
    CHATTINESS_HELP,
    HEDGE_HELP,
    KNOWLEDGE_HELP,
    PRESET_HELP,
    RESPONDER_HELP,
    RESPONDER_URL_HELP,
    TOOLS_HELP,
    WITHDRAW_HELP,
    app,
    console,
    fail,
    load_assistant,
    publish_target,
)
from chimein.paths import train_config_path
from chimein.presets import DEFAULT_PRESET


@app.command()
def train(
    dataset: Annotated[str, typer.Option(help="Dataset version (local:ds-…, hub:ORG/NAME@ds-…) or a JSONL file.")],
    model: Annotated[str, typer.Option("--preset", "--model", help=PRESET_HELP)] = DEFAULT_PRESET,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default: one epoch).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run from its last checkpoint.")] = False,
    config: Annotated[Optional[str], typer.Option("--train-config", "--config", help="Training config (TrainConfig): a name in conf/train/ (e.g. offline-cpu) or a YAML path; options override it.", callback=train_config_path)] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Compute dtype: auto, bfloat16, float16, float32.")] = None,
    no_4bit: Annotated[bool, typer.Option("--no-4bit", help="LoRA on full-precision weights instead of QLoRA.")] = False,
    publish: Annotated[str, typer.Option(help="'local' (store/adapters/NAME) or 'hub:ORG/NAME'.", callback=publish_target)] = "local",
    output_dir: Annotated[Optional[str], typer.Option(help="Checkpoints go to OUTPUT_DIR/RUN_NAME/.")] = None,
    allow_cpu: Annotated[bool, typer.Option(help="Train a preset that needs a GPU (the 7B ones) on this machine without CUDA anyway.")] = False,
    compile: Annotated[Optional[str], typer.Option("--compile", help="'layers': torch.compile each decoder layer (~30 s once, ~1.4x faster CPU steps; offline-cpu's setting), 'off': eager. Default: the config's.")] = None,
    processes: Annotated[Optional[int], typer.Option(min=1, help="Train on N processes (DDP, launched by torchrun): on a GPU host one per GPU, at most the GPUs it has; else CPU processes. The global batch stays per-device × accumulation (each process accumulates 1/N of it). Resume with the same N.")] = None,
) -> None:
    """QLoRA-train an adapter on a dataset version; track it in MLflow; publish the adapter."""
    from pydantic import ValidationError

    from chimein.data.dataset import DamagedDataset
    from chimein.models import adapters
    from chimein.models.loading import PadTokenError
    from chimein.ops import tracking
    from chimein.presets import HardwareError
    from chimein.train.config import load_train_config, preflight
    from chimein.train.distributed import DistributedTrainingError
    from chimein.train.launch import train as run
    from chimein.train.trainer import TrainingGuardError

    try:
        cfg = load_train_config(config, model=model, dataset=dataset, output_dir=output_dir,
                                **{"trainer.max_steps": max_steps, "quantization.compute_dtype": dtype,
                                   "quantization.load_in_4bit": False if no_4bit else None,
                                   "trainer.processes": processes, "trainer.compile": compile})
        preflight(cfg, allow_cpu)  # before any download
        result = run(cfg, resume=resume)
        where = adapters.publish_adapter(result.adapter_dir, result.run_name, publish)
    except (ValidationError, FileNotFoundError, FileExistsError, HardwareError, PadTokenError,
            PermissionError, TrainingGuardError, ValueError, DistributedTrainingError, DamagedDataset) as e:
        fail(str(e))
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


@app.command()
def chat(
    adapter: Annotated[Optional[str], typer.Option(help="Adapter: DIR, local:NAME, hub:ORG/NAME, models:/NAME@ALIAS.")] = None,
    base: Annotated[Optional[str], typer.Option(help="Or a preset's un-tuned base model.")] = None,
    chattiness: Annotated[Optional[float], typer.Option(help=CHATTINESS_HELP)] = None,
    responder: Annotated[Optional[str], typer.Option(help=RESPONDER_HELP)] = None,
    responder_base_url: Annotated[Optional[str], typer.Option(help=RESPONDER_URL_HELP)] = None,
    tools: Annotated[bool, typer.Option(help=TOOLS_HELP)] = True,
    hedge: Annotated[bool, typer.Option(help=HEDGE_HELP)] = True,
    withdraw: Annotated[bool, typer.Option(help=WITHDRAW_HELP)] = True,
    knowledge: Annotated[Optional[str], typer.Option(help=KNOWLEDGE_HELP, metavar="PATH|none")] = None,
) -> None:
    """An interactive group chat in the terminal. Type `Name: message`; /as NAME switches the
    speaker, /force makes the assistant answer the last message, /reset, /quit."""
    from chimein.conversation import InvalidConversation

    bot = load_assistant(adapter, base, chattiness, responder, responder_base_url, tools, hedge, withdraw,
                         knowledge)
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
        if d.responder_error:
            console.print(f"[yellow]the responder failed ({escape(d.responder_error)}); the local model replied[/]",
                          highlight=False, soft_wrap=True, markup=True)
        how = f"p_speak {d.p_speak:.2f}" + (f" · tool {d.tool}" if d.tool else "") + \
            (f" · not sure: confidence {d.confidence:.2f}" if d.hedged else "")
        if d.speak:
            console.print(f"[bold green]assistant[/] [dim]({how})[/]: {escape(d.response)}", highlight=False)
        else:
            console.print(f"[dim]  (silence · {how}{' · withdrew a guess' if d.hedged else ''})[/]")


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
    responder: Annotated[Optional[str], typer.Option(help=RESPONDER_HELP)] = None,
    responder_base_url: Annotated[Optional[str], typer.Option(help=RESPONDER_URL_HELP)] = None,
    tools: Annotated[bool, typer.Option(help=TOOLS_HELP)] = True,
    hedge: Annotated[bool, typer.Option(help=HEDGE_HELP)] = True,
    withdraw: Annotated[bool, typer.Option(help=WITHDRAW_HELP)] = True,
    knowledge: Annotated[Optional[str], typer.Option(help=KNOWLEDGE_HELP, metavar="PATH|none")] = None,
) -> None:
    """Serve the assistant over HTTP (conversation API and an OpenAI-style endpoint)."""
    import uvicorn

    from chimein.runtime.server import create_app

    bot = load_assistant(adapter, base, chattiness, responder, responder_base_url, tools, hedge, withdraw,
                         knowledge)
    bot.max_new_tokens = max_new_tokens
    console.print(f"serving on http://{host}:{port} "
                  f"(POST /v1/conversations/ID/messages, POST /v1/chat/completions)", soft_wrap=True)
    app = create_app(bot, max_conversations, max_cache_mb=max_cache_mb,
                     max_body_bytes=int(max_body_mb * 2**20), max_messages=max_messages,
                     max_batch=max_batch)
    uvicorn.run(app, host=host, port=port, log_level="warning")
