"""Compare: retrain several model presets on the same dataset version, as child MLflow runs of one
parent run, and publish a comparison table and an overlaid loss plot.

    .venv/bin/python flows/compare.py      # the three 7B presets: run it on a GPU work pool
    prefect deployment run compare/compare-7b --params '{"params": {"presets": ["tiny-chatml", "tiny-llama-2"]}}'
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, Field

from chimein.training import tracking_uri
from flows.retrain import RetrainParams, retrain

KEY_METRICS = ["final_train_loss", "balanced_accuracy", "f1", "macro_f1", "missed_intervention_rate",
               "false_interruption_rate", "format_compliance"]


class CompareParams(BaseModel):
    presets: list[str] = Field(["zephyr-7b-beta", "llama-2-7b-chat", "openchat-3.5-0106"],
                               description="Model presets to train on the same data (7B ones need a GPU).")
    retrain: RetrainParams = Field(RetrainParams(train_config=None),
                                   description="Shared retrain parameters; preset is set per child.")
    experiment: str = "chimein"


def loss_overlay(client, runs: dict[str, str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for preset, run_id in runs.items():
        hist = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
        ax.plot([m.step for m in hist], [m.value for m in hist], marker=".", label=preset)
    ax.set(xlabel="optimizer step", ylabel="train loss (assistant tokens)", title="loss by preset")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@flow(name="compare")
def compare(params: CompareParams = CompareParams()) -> list[dict]:
    import mlflow

    # one parent run; every preset's training is a child run of it
    client = mlflow.MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name(params.experiment) or \
        client.get_experiment(client.create_experiment(params.experiment))
    parent = client.create_run(experiment.experiment_id,
                               run_name=f"compare--{'+'.join(params.presets)}")
    rows, runs = [], {}
    for preset in params.presets:
        summary = retrain(params.retrain.model_copy(update={"preset": preset}),
                          parent_run_id=parent.info.run_id)
        runs[preset] = summary["run_id"]
        # the shipped benchmark when it was scored (comparable across presets), else the held-out split
        scored = summary["benchmark"] or summary["heldout"]
        rows.append({"preset": preset, "run_id": summary["run_id"], "dataset": summary["dataset"],
                     "evaluated_on": summary["benchmark_fingerprint"] or "held-out split",
                     "final_train_loss": summary["final_train_loss"],
                     **{k: scored.get(k) for k in KEY_METRICS[1:]}})

    # the comparison, for people: a Prefect artifact and the parent run's artifacts
    create_table_artifact(key="comparison", table=rows, description="presets on one dataset version")
    out = Path("outputs/compare") / parent.info.run_id
    out.mkdir(parents=True, exist_ok=True)
    client.log_artifact(parent.info.run_id, str(loss_overlay(client, runs, out / "loss_by_preset.png")))
    client.log_dict(parent.info.run_id, {"runs": rows}, "comparison.json")
    client.set_terminated(parent.info.run_id)
    for r in rows:
        get_run_logger().info(f"{r['preset']:<24} loss {r['final_train_loss']:.3f}  balanced accuracy "
                              f"{r['balanced_accuracy']:.3f} ({r['evaluated_on']})")
    return rows


if __name__ == "__main__":
    compare()
