"""`chimein eval`: the assistant (fine-tuned, its base, the OpenAI baseline) scored on the shipped
benchmark, a dataset version's held-out split or a file, and logged to MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

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
    err,
    fail,
    knowledge_arg,
    responder_or_fail,
)
from chimein.data.generation_config import DEFAULT_MODELS
from chimein.evaluate.answers import ANSWER_METRICS


def _grounded(where: str | None):
    """--grounded: None, the shipped grounded benchmark, or one in a folder (exits on a bad one)."""
    if where is None:
        return None
    from chimein.evaluate.answers import AnnotationError
    from chimein.evaluate.grounded import GROUNDED_DIR, load_grounded

    try:
        return load_grounded(GROUNDED_DIR if where == "shipped" else Path(where))
    except (FileNotFoundError, AnnotationError, ValueError) as e:
        fail(f"--grounded {where}: {e}")


@app.command("eval")
def evaluate_cmd(
    data: Annotated[str, typer.Option(help="'benchmark' (the shipped hand-written chats), JSON Lines of conversations, or a dataset version (local:ds-…, hub:ORG/NAME@ds-…) whose held-out test split is used.")] = "benchmark",
    adapter: Annotated[Optional[str], typer.Option(help="The fine-tuned adapter to evaluate.")] = None,
    baseline: Annotated[Optional[list[str]], typer.Option(help="'base' (needs --preset) and/or 'openai'.")] = None,
    model: Annotated[Optional[str], typer.Option("--preset", "--model", help="Preset of the base baseline (default: the adapter's).")] = None,
    openai_model: Annotated[str, typer.Option(help="Model of the openai baseline.")] = DEFAULT_MODELS["openai"],
    openai_base_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible base URL.")] = None,
    chattiness: Annotated[Optional[float], typer.Option(help=CHATTINESS_HELP)] = None,
    responder: Annotated[Optional[str], typer.Option(help=RESPONDER_HELP + " Scored as the fine-tuned system's replies.")] = None,
    responder_base_url: Annotated[Optional[str], typer.Option(help=RESPONDER_URL_HELP)] = None,
    tools: Annotated[bool, typer.Option(help=TOOLS_HELP)] = True,
    hedge: Annotated[bool, typer.Option(help=HEDGE_HELP)] = True,
    withdraw: Annotated[bool, typer.Option(help=WITHDRAW_HELP)] = True,
    knowledge: Annotated[Optional[str], typer.Option(help=KNOWLEDGE_HELP, metavar="PATH|none")] = None,
    grounded: Annotated[Optional[str], typer.Option(help="Also score with documents: 'shipped' (the grounded benchmark: chats about invented organisations, their documents as knowledge) or a folder laid out like it (NAME.jsonl, NAME.answers.jsonl, NAME/ with the documents). Right answers from the documents, and 'the documents don't say' where they don't.", metavar="shipped|DIR")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate only the first N conversations.")] = None,
    replies: Annotated[bool, typer.Option(help="Generate replies where the system speaks (reply similarity); --no-replies scores decisions only, several times faster.")] = True,
    out: Annotated[Path, typer.Option(help="JSON report.")] = Path("outputs/eval/report.json"),
    track: Annotated[bool, typer.Option(help="Log an MLflow run per system with its metrics (bench.*, heldout.* or file.*, as on training runs) and the report; the fine-tuned one nested under its training run.")] = True,
    log_to_run: Annotated[bool, typer.Option(help="Also record the fine-tuned adapter's benchmark metrics on its own training run (bench.*), e.g. to re-score a champion so promotion can compare with it.")] = False,
) -> None:
    """Evaluate when-to-speak decisions and replies, fine-tuned and baselines side by side."""
    import json

    from chimein.data.dataset import DamagedDataset
    from chimein.evaluate.benchmark import load_eval_set
    from chimein.evaluate.metrics import HEADLINE_METRICS, OpenAIBaseline
    from chimein.evaluate.run import record, score
    from chimein.models.loading import quiet
    from chimein.runtime.assistant import BASELINE_PROMPT, GroupChatAssistant
    from chimein.runtime.state import DEFAULT_CHATTINESS

    baseline = baseline or []
    if unknown := set(baseline) - {"base", "openai"}:
        fail(f"unknown baseline(s) {', '.join(sorted(unknown))}: use 'base' or 'openai'")
    if not adapter and not baseline:
        fail("nothing to evaluate: pass --adapter and/or --baseline")
    if log_to_run and (data != "benchmark" or not adapter or limit):
        fail("--log-to-run records the whole benchmark on the adapter's run: pass --adapter, "
              "keep --data benchmark and drop --limit")
    try:
        evalset = load_eval_set(data)
    except (FileNotFoundError, DamagedDataset) as e:
        fail(str(e))
    bench, fingerprint, total = evalset.benchmark, evalset.fingerprint, evalset.total_decisions
    convs, rejected = evalset.conversations, evalset.rejected
    convs = convs[:limit] if limit else convs
    if not convs:
        fail(f"{data}: no valid conversation to evaluate")
    grounded_bench = _grounded(grounded)  # a bad folder fails before any model loads
    systems = {}
    if adapter:
        with err.status("loading the adapter"), quiet():
            try:
                systems["fine-tuned"] = GroupChatAssistant.from_adapter(adapter, chattiness=chattiness, tools=tools,
                                                                              hedge=hedge, withdraw=withdraw,
                                                                              knowledge=knowledge_arg(knowledge))
            except (FileNotFoundError, ValueError) as e:  # no such adapter, no MLflow store for models:/…,
                fail(str(e))                                # or a knowledge folder that cannot be indexed
        systems["fine-tuned"].responder = responder_or_fail(responder, responder_base_url)
    if "base" in baseline:
        preset = model or (systems["fine-tuned"].preset.name if adapter else None)
        if not preset:
            fail("--baseline base needs --preset PRESET (or --adapter, whose base is used)")
        with err.status("loading the base model"), quiet():
            systems["base"] = GroupChatAssistant.from_preset(
                preset, chattiness=DEFAULT_CHATTINESS if chattiness is None else chattiness, system_prompt=BASELINE_PROMPT,
                tools=tools, hedge=hedge, withdraw=withdraw, knowledge=knowledge_arg(knowledge, None))
    if "openai" in baseline:
        try:
            systems["openai"] = OpenAIBaseline(openai_model, openai_base_url)
        except RuntimeError as e:
            fail(str(e))
    scored, results = {}, {}
    for name, system in systems.items():  # the same path as the retrain flow's evaluations
        err.print(f"[bold]{name}[/]")
        s = scored[name] = score(system, evalset, limit, replies=replies, progress=True)
        results[name] = s.report | {"chattiness": s.chattiness, "chattiness_source": s.chattiness_source}
        if s.by_case is not None:
            results[name]["by_case"] = s.by_case
    if grounded_bench is not None:
        from chimein.evaluate.grounded import score_grounded

        for name, system in systems.items():
            if isinstance(system, GroupChatAssistant):
                err.print(f"[bold]{name}[/] with documents ({grounded_bench.fingerprint})")
                results[name]["grounded"] = score_grounded(system, grounded_bench, progress=True)
    decisions = results[next(iter(results))]["metrics"]["decisions"]
    full = {"data": data, "fingerprint": fingerprint, "conversations": len(convs),
            "decisions": decisions, "total_decisions": total, "rejected": rejected, "systems": results}
    for name, system in systems.items():
        if getattr(system, "responder", None) is not None:
            st = system.responder.stats.summary()
            results[name]["responder"] = st
            console.print(f"{name}: replies from {system.responder.name}: {st['served']} of {st['calls']} "
                          f"served, {st['failures']} failed (the local model replied), {st['prompt_tokens']} "
                          f"prompt + {st['completion_tokens']} completion tokens, {st['seconds']:.1f} s waiting",
                          highlight=False, soft_wrap=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(full, indent=2, ensure_ascii=False))

    keys = [*HEADLINE_METRICS, *ANSWER_METRICS, "response_similarity", "best_chattiness"]
    table = Table("metric", *results, title=f"{fingerprint}: {len(convs)} conversations, {decisions} "
                  f"of {total} decisions")
    table.add_row("chattiness", *(f"{r['chattiness']:.3f}" if r["chattiness"] is not None else "-"
                                  for r in results.values()))
    for k in keys:
        vals = [results[n]["metrics"].get(k) for n in results]  # no reply metric without replies
        table.add_row(k, *("-" if v is None else str(v) if isinstance(v, int) else f"{v:.3f}" for v in vals))
    console.print(table)
    if bench and not limit:
        cases = Table("hard case", "decisions", *(f"{n} bal. acc." for n in results), title="by case")
        for case, m in results[next(iter(results))]["by_case"].items():
            cases.add_row(case, str(m["decisions"]),
                          *(f"{results[n]['by_case'][case]['balanced_accuracy']:.3f}" for n in results))
        console.print(cases)
        langs = [k for k in results[next(iter(results))]["by_case"] if k.startswith("lang:")]
        if any("factual_turns" in results[n]["by_case"][lang] for n in results for lang in langs):
            rates = Table("language", *(f"{n} {r}" for n in results for r in ("right", "hedged", "wrong")),
                          title="replies at factual turns (forced)")
            for lang in langs:
                rates.add_row(lang.removeprefix("lang:"), *(
                    "-" if (m := results[n]["by_case"][lang]).get("factual_turns") is None else f"{m[k]:.3f}"
                    for n in results for k in ("answer_accuracy", "hedge_rate", "confident_error_rate")))
            console.print(rates)
    if grounded_bench is not None:
        from chimein.evaluate.grounded import METRICS as GROUNDED_METRICS

        with_docs = {n: r["grounded"]["metrics"] for n, r in results.items() if "grounded" in r}
        table = Table("metric", *with_docs, title=f"with documents: {grounded_bench.fingerprint}, "
                      f"{grounded_bench.summary()['conversations']} chats")
        for k in (*GROUNDED_METRICS, "answered_turns", "unanswered_turns"):
            table.add_row(k, *(str(m[k]) if isinstance(m[k], int) else f"{m[k]:.3f}" for m in with_docs.values()))
        console.print(table)
    console.print(f"report: {out}")
    if not (track or log_to_run):
        return
    # one logging scheme (chimein.evaluate.run.record): PREFIX.METRIC and the stamp as PREFIX.*
    # tags, on a run of each system's own, and with --log-to-run on the adapter's training run too
    from chimein.evaluate.records import start_evaluation_run
    from chimein.ops import tracking

    client, prefix = tracking.client(), evalset.prefix
    if track:
        for name, system in systems.items():
            tuned = isinstance(system, GroupChatAssistant) and name == "fine-tuned"
            run_id = start_evaluation_run(
                client, name, data, scored[name].stamp, trained_run_id=system.adapter_meta.get("mlflow_run_id") if tuned else None,
                params={"data": data, "system": name, "adapter": adapter if tuned else None,
                        "model": system.preset.name if isinstance(system, GroupChatAssistant) else openai_model,
                        "chattiness": results[name]["chattiness"], "conversations": len(convs), "replies": replies})
            record(client, run_id, scored[name])
            if "grounded" in results[name]:
                from chimein.evaluate.grounded import record_grounded

                record_grounded(client, run_id, results[name]["grounded"])
            client.log_artifact(run_id, str(out))
            client.set_terminated(run_id)
            console.print(f"MLflow run {run_id}: {name} ({prefix}.*)", highlight=False)
        console.print(tracking.ui_hint(run_id), soft_wrap=True)
    if log_to_run:
        run_id = systems["fine-tuned"].adapter_meta["mlflow_run_id"]
        record(client, run_id, scored["fine-tuned"])
        console.print(f"recorded {prefix}.* on the adapter's training run {run_id}")
