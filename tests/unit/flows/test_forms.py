"""The Prefect run forms of the deployed flows read like a product's: each field takes a value
directly (no `int | None` type switch), has a plain title and description, names no internal
class, and offers a choice where the set is known; old-style `null` values still validate. And a
name a person typed for a flow run is kept."""

from __future__ import annotations

import re

import pytest
from prefect.utilities.callables import parameter_schema

from chimein.paths import conf_dir, list_train_configs
from flows import naming
from flows.compare import compare
from flows.generate import generate
from flows.retrain import RetrainParams, retrain

INTERNAL = re.compile(r"GenerationSettings|GenerationConfig|DEFAULT_MODELS|RetrainParams|None|`generation`")


def fields(schema: dict):
    """(definition, name, property) for every field of the flow's parameter models."""
    for definition, model in schema["definitions"].items():
        for name, prop in model["properties"].items():
            yield definition, name, prop


@pytest.mark.parametrize("flow", [retrain, compare, generate], ids=lambda f: f.name)
def test_every_field_takes_a_value_directly_and_reads_plainly(flow):
    schema = parameter_schema(flow).model_dump()
    found = list(fields(schema))
    assert len(found) >= 5
    for definition, name, prop in found:
        where = f"{definition}.{name}"
        # a type switch in the form: anyOf/oneOf with a null branch, or a list of types with null
        assert "anyOf" not in prop and "oneOf" not in prop, where
        assert not isinstance(prop.get("type"), list), where
        assert prop.get("default", "") is not None, where  # a default of null shows the switch too
        if "$ref" in prop:  # a group: its title is the referenced model's
            prop = schema["definitions"][prop["$ref"].rsplit("/", 1)[1]]
        assert prop.get("title") and prop.get("description"), where
        assert not INTERNAL.search(prop["title"] + prop["description"]), (where, prop)
    for definition, model in schema["definitions"].items():
        assert not re.search(r"[a-z][A-Z]", model["title"]), model["title"]  # not a class name


def test_choices_where_the_set_is_known():
    props = parameter_schema(retrain).model_dump()["definitions"]["RetrainParams"]["properties"]
    assert props["train_config"]["enum"] == list_train_configs()
    assert list_train_configs() == ["defaults", *sorted(p.stem for p in (conf_dir() / "train").glob("*.yaml"))]
    assert "offline-cpu" in props["train_config"]["enum"]
    assert "tiny-chatml" in props["preset"]["enum"] and "zephyr-7b-beta" in props["preset"]["enum"]
    assert props["night"] == {"description": props["night"]["description"], "format": "date",
                              "title": "Night", "type": "string"}  # a date picker that may stay empty


def test_values_sent_before_the_fields_had_defaults_still_mean_the_same():
    old = RetrainParams.model_validate({
        "train_config": None, "max_steps": None, "benchmark_limit": None, "heldout_limit": None,
        "chattiness": None, "night": None, "generation": {"model": None, "base_url": None}})
    assert old == RetrainParams(train_config="defaults")
    assert old.fixed_chattiness is None and old.max_steps == 0 and old.generation.model == ""
    assert RetrainParams(chattiness=0.3).fixed_chattiness == 0.3
    assert str(RetrainParams.model_validate({"night": "2026-11-01"}).night) == "2026-11-01"
    assert RetrainParams.model_validate({"night": ""}).night is None  # the form's empty date
    assert RetrainParams(train_config="x.yaml").train_config == "x.yaml"  # a direct call may pass a path
    with pytest.raises(ValueError, match="less than or equal to 1"):
        RetrainParams(chattiness=1.5)


@pytest.mark.parametrize(("current", "kept"), [
    ("crazy-koala", False),  # Prefect's generated name (or the form's)
    ("lr-sweep 2e-4", True), ("Monday retry", True), ("zephyr-retry-2", True), (None, False)])
def test_a_typed_run_name_is_kept_and_a_generated_one_replaced(monkeypatch, current, kept):
    from prefect.runtime import flow_run

    monkeypatch.setitem(flow_run.FIELDS, "name", lambda: current)
    assert naming.typed_name_or("tiny-chatml--offline-8--2026-12-05") == (
        current if kept else "tiny-chatml--offline-8--2026-12-05")
