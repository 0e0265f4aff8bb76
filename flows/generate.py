"""Generate: synthetic conversations from a source, published as a versioned dataset — no training.

    .venv/bin/python flows/generate.py
    prefect deployment run generate/generate --params '{"params": {"generation": {"source": "openai", "count": 500}}}'
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from chimein.data.generation_config import GenerationSettings, load_generation_config
from chimein.paths import PublishTarget
from flows.naming import typed_name_or
from tasks.data import add_feedback, build_and_publish_dataset, check_feedback, generate_conversations


class GenerateParams(BaseModel):
    """New conversations into a new dataset version (the retrain flow shares these fields)."""

    model_config = ConfigDict(extra="forbid", title="Generate")

    generation: GenerationSettings = Field(GenerationSettings(), title="Conversations",
                                          description=GenerationSettings.__doc__)
    publish_dataset: PublishTarget = Field("local", title="Publish the dataset to", description="local: "
                                           "the store on the worker; hub:ORG/NAME: a Hugging Face dataset repo.")
    data_dir: str = Field("outputs/generated", title="Conversations directory",
                          description="Where the generated conversations are written, on the worker.")
    refresh: bool = Field(False, title="Make everything again", description="Ignore the cache: make the "
                          "conversations again (every API call) and the dataset.")


def run_name() -> str:
    """What runs: e.g. `openai-500--2026-11-01`."""
    from prefect.runtime import flow_run

    g = GenerateParams.model_validate(flow_run.parameters.get("params", {})).generation
    return typed_name_or(f"{g.source}-{g.count}--{flow_run.scheduled_start_time.date()}")


@flow(name="generate", flow_run_name=run_name)
def generate(params: GenerateParams = GenerateParams()) -> str:
    config = load_generation_config(**params.generation.model_dump())
    check_feedback(config.feedback)
    conversations = generate_conversations.with_options(refresh_cache=params.refresh)(
        config, params.data_dir, fresh=params.refresh)
    if config.feedback:  # the recorded rooms, beside the generated conversations
        conversations = add_feedback(conversations, config.feedback)
    dataset = build_and_publish_dataset.with_options(refresh_cache=params.refresh)(
        conversations, params.publish_dataset)
    get_run_logger().info(f"{conversations} → {dataset}")
    return dataset


if __name__ == "__main__":
    generate()
