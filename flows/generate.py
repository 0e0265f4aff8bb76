"""Generate: synthetic conversations from a source, published as a versioned dataset — no training.

    .venv/bin/python flows/generate.py
    prefect deployment run generate/generate --params '{"generation": {"source": "openai", "count": 500}}'
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from chimein.generation import load_generation_config
from flows.retrain import GenerationOptions
from tasks.data import build_and_publish_dataset, generate_conversations


@flow(name="generate")
def generate(generation: GenerationOptions = GenerationOptions(), publish_dataset: str = "local",
             data_dir: str = "outputs/generated", refresh: bool = False) -> str:
    config = load_generation_config(**generation.model_dump())
    conversations = generate_conversations.with_options(refresh_cache=refresh)(
        config, data_dir, fresh=refresh)
    dataset = build_and_publish_dataset.with_options(refresh_cache=refresh)(conversations, publish_dataset)
    get_run_logger().info(f"{conversations} → {dataset}")
    return dataset


if __name__ == "__main__":
    generate()
