"""Compare: retrain several model presets on the same dataset version, as child MLflow runs of one
parent run (all in the parent's experiment), and publish a comparison table and an overlaid loss plot.

    .venv/bin/python flows/compare.py      # the three 7B presets: run it on a GPU work pool
    prefect deployment run compare/compare-7b --params '{"params": {"presets": ["tiny-chatml", "tiny-llama-2"]}}'
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from chimein.evaluate.metrics import HEADLINE_METRICS
from chimein.ops import tracking
from chimein.presets import PresetName, check_hardware, load_preset
from flows.naming import typed_name_or
from flows.retrain import RetrainParams, retrain
from tasks.model import flow_run_tags, link_mlflow_run


class CompareParams(BaseModel):
    """Train several models on the same conversations and compare them in MLflow."""

    model_config = ConfigDict(title="Compare")

    presets: list[PresetName] = Field(["zephyr-7b-beta", "llama-2-7b-chat", "openchat-3.5-0106"], title="Models",
                                      description="The base models to train on the same data (the 7B ones need a GPU).")
    retrain: RetrainParams = Field(RetrainParams(train_config=None), title="Each retrain",
                                   description="What every model's retrain does; its model is set per model above.")
    experiment: str = Field(tracking.DEFAULT_EXPERIMENT, title="MLflow experiment",
                            description="The experiment of the comparison's run; every model's run joins it.")


def run_name() -> str:
    """What runs: e.g. `tiny-chatml+tiny-llama-2--2026-11-01` (the presets, the day it runs)."""
    from prefect.runtime import flow_run

    p = CompareParams.model_validate(flow_run.parameters.get("params", {}))
    return typed_name_or(f"{'+'.join(p.presets)}--{flow_run.scheduled_start_time.date()}")


@flow(name="compare", flow_run_name=run_name)
def compare(params: CompareParams = CompareParams()) -> list[dict]:
    log = get_run_logger()

    # hardware: every preset is checked before the first one trains (a 7B one needs a GPU worker)
    for preset in params.presets:
        check_hardware(load_preset(preset), params.retrain.allow_cpu)

    # one parent run; every preset's training is a child run of it, in its experiment
    client = tracking.client()
    parent = client.create_run(
        tracking.experiment_id(client, params.experiment), run_name=f"compare--{'+'.join(params.presets)}",
        tags=flow_run_tags() | {tracking.NOTE: f"Comparison of {', '.join(params.presets)} trained on one "
                                "dataset version: the child runs, `comparison.json` and `loss_by_preset.png`."})
    parent_id = parent.info.run_id
    link_mlflow_run(parent_id, "the comparison's MLflow run")
    try:
        rows, runs = [], {}
        for preset in params.presets:
            summary = retrain(params.retrain.model_copy(update={"preset": preset}), parent_run_id=parent_id)
            runs[preset] = summary["run_id"]
            # the shipped benchmark when it was scored (comparable across presets), else the held-out split
            scored = summary["benchmark"] or summary["heldout"]
            rows.append({"preset": preset, "run_id": summary["run_id"], "dataset": summary["dataset"],
                         "evaluated_on": summary["benchmark_fingerprint"] or "held-out split",
                         "train_loss": summary["train_loss"],
                         **{k: scored.get(k) for k in HEADLINE_METRICS}})

        # the comparison, for people: a Prefect artifact and the parent run's artifacts
        create_table_artifact(key="comparison", description="presets on one dataset version", table=[
            {k.replace("_", " "): f"{v:.3f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows])
        out = Path("outputs/compare") / parent_id
        out.mkdir(parents=True, exist_ok=True)
        client.log_artifact(parent_id, str(tracking.loss_plot(client, runs, out / "loss_by_preset.png",
                                                              "loss by preset")))
        client.log_dict(parent_id, {"runs": rows}, "comparison.json")
    except BaseException:
        client.set_terminated(parent_id, "FAILED")
        raise
    client.set_terminated(parent_id)
    for r in rows:
        log.info(f"{r['preset']:<24} loss {r['train_loss']:.3f}  balanced accuracy "
                 f"{r['balanced_accuracy']:.3f} ({r['evaluated_on']})")
    log.info(tracking.ui_hint(parent_id))
    return rows


if __name__ == "__main__":
    compare()
