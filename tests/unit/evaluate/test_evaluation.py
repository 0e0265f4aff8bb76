"""Evaluation: every metric on hand-computed cases, teacher-forced replay, reply similarity, the
prompted OpenAI baseline over HTTP, and `chimein eval` end to end."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from chimein.cli import app
from chimein.conversation import parse_conversation
from chimein.evaluate.metrics import (
    HEADLINE_METRICS,
    REPLY_METRICS,
    OpenAIBaseline,
    decision_metrics,
    evaluate,
    pr_curve,
    report,
    similarity,
)
from chimein.runtime.state import Decision
from tests.fakes.fake_llm import FakeLLM


def test_decision_metrics_by_hand():
    # tp=1 fn=2 fp=1 tn=4
    labels = [True, True, True, False, False, False, False, False]
    preds = [True, False, False, True, False, False, False, False]
    m = decision_metrics(labels, preds)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (1, 2, 1, 4)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(0.4)  # 2 * (1/2 * 1/3) / (1/2 + 1/3)
    assert m["f1_silence"] == pytest.approx(8 / 11)  # npv 4/6, specificity 4/5
    assert m["macro_f1"] == pytest.approx((0.4 + 8 / 11) / 2)
    assert m["balanced_accuracy"] == pytest.approx((1 / 3 + 4 / 5) / 2)
    assert m["missed_intervention_rate"] == pytest.approx(2 / 3)
    assert m["false_interruption_rate"] == pytest.approx(1 / 5)
    assert m["accuracy"] == pytest.approx(5 / 8)


def test_degenerate_cases_do_not_divide_by_zero():
    m = decision_metrics([False, False], [False, False])
    assert (m["precision"], m["recall"], m["f1"], m["false_interruption_rate"]) == (0, 0, 0, 0)
    assert m["f1_silence"] == 1 and m["balanced_accuracy"] == 0.5


def test_pr_curve_and_best_threshold_by_hand():
    labels = [True, False, True, False]
    scores = [0.9, 0.8, 0.4, 0.1]
    curve, best = pr_curve(labels, scores)
    by_t = {p["threshold"]: (p["precision"], p["recall"]) for p in curve}
    assert by_t[0.9] == (1.0, 0.5)
    assert by_t[0.8] == (0.5, 0.5)
    assert by_t[0.4] == pytest.approx((2 / 3, 1.0))
    assert by_t[0.1] == (0.5, 1.0)
    assert best["threshold"] == 0.4 and best["f1"] == pytest.approx(0.8)


class Scripted:
    """A system that speaks when the message contains '?', recording what it was told."""

    def __init__(self):
        self.history, self.resets = [], 0

    def reset(self):
        self.resets += 1
        self.history = []

    def add(self, name, content, reply=True):
        self.history.append(("user", content))
        speak = "?" in content
        return Decision(speak=speak, p_speak=0.9 if speak else 0.1, response="Paris." if speak else None,
                        format_mass=0.3 if "odd" in content else 1.0)

    def set_reply(self, reply):
        self.history.append(("assistant", reply))


def test_evaluate_replays_with_the_reference_history():
    convs = [parse_conversation([
        {"role": "user", "name": "A", "content": "capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "name": "B", "content": "nice"},
        {"role": "user", "name": "A", "content": "and Spain?"},
    ]), parse_conversation([{"role": "user", "name": "C", "content": "odd one"},
                            {"role": "assistant", "content": "Hello!"}])]
    system = Scripted()
    records = evaluate(system, convs)
    assert [(r.conversation, r.turn, r.label, r.speak) for r in records] == [
        (0, 0, True, True), (0, 2, False, False), (0, 3, False, True), (1, 0, True, False)]
    assert system.resets == 2
    assert system.history == [("user", "odd one"), ("assistant", "Hello!")]  # teacher forced
    r = report(records, with_similarity=False)["metrics"]
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (1, 1, 1, 1)
    assert set(HEADLINE_METRICS) <= set(r) and len(set(HEADLINE_METRICS)) == len(HEADLINE_METRICS)
    assert r["format_compliance"] == 0.75 and r["similarity_pairs"] == 1
    decisions_only = report(records, with_similarity=False, replies=False)["metrics"]
    assert not set(REPLY_METRICS) & set(decisions_only) and decisions_only["tp"] == 1


def test_similarity_of_replies():
    same = similarity([("The capital of France is Paris.", "The capital of France is Paris.")])
    close = similarity([("Paris is the capital of France.", "It's Paris, France's capital.")])
    far = similarity([("Paris is the capital of France.", "Bring an umbrella tomorrow.")])
    assert same == pytest.approx(1.0, abs=1e-5) and far < close < same


def test_openai_baseline_over_http(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-real")
    with FakeLLM("openai", ["(silence)", "(response) Frank Herbert.", "Sure thing!"]) as fake:
        b = OpenAIBaseline("gpt-4o-mini", fake.base_url)
        d1 = b.add("Ana", "hi all")
        d2 = b.add("Bo Li!", "who wrote Dune?")
        b.set_reply("Frank Herbert wrote it.")
        d3 = b.add("Ana", "thanks")
    assert (d1.speak, d2.speak, d2.response, d3.speak, d3.format_mass) == \
        (False, True, "Frank Herbert.", True, 0.0)
    last = fake.requests[-1]["messages"]
    assert last[0]["role"] == "system" and "(silence)" in last[0]["content"]
    users = [m for m in last if m["role"] == "user"]
    assert [u["name"] for u in users] == ["Ana", "Bo_Li_", "Ana"]
    # a reminder system message follows every user message
    assert all(last[last.index(u) + 1]["role"] == "system" for u in users)
    assert {"role": "assistant", "content": "(response) Frank Herbert wrote it."} in last


def test_openai_baseline_needs_a_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY"):
        OpenAIBaseline()


def test_eval_cli_base_and_openai_side_by_side(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-real")
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps([
        {"role": "user", "name": "Ana", "content": "hi"},
        {"role": "user", "name": "Ben", "content": "assistant, who wrote Dune?"},
        {"role": "assistant", "content": "Frank Herbert."}]) + "\n")
    with FakeLLM("openai", ["(silence)", "(response) Frank Herbert."]) as fake:
        r = CliRunner().invoke(app, ["eval", "--data", str(data), "--baseline", "base", "--preset",
                                     "tiny-chatml", "--baseline", "openai", "--openai-base-url",
                                     fake.base_url, "--out", "report.json"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "report.json").read_text())
    assert set(rep["systems"]) == {"base", "openai"}
    assert rep["systems"]["openai"]["metrics"]["f1"] == 1.0
    assert rep["systems"]["base"]["metrics"]["decisions"] == 2
    assert "macro_f1" in r.output and "MLflow run" in r.output
    import mlflow

    # one run per system, in the pipeline's experiment, with the names training runs use (file.*)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {r.data.tags["chimein.system"]: r for r in
            client.search_runs([client.get_experiment_by_name("chimein").experiment_id])}
    assert set(runs) == {"base", "openai"} and runs["openai"].data.metrics["file.f1"] == 1.0
    assert runs["openai"].data.tags["file.chattiness_source"] == "model output"
    assert runs["base"].data.tags["file.fingerprint"] == rep["fingerprint"]


def test_eval_cli_on_a_dataset_versions_test_split(tmp_path, monkeypatch):
    from chimein.data.corpus import CORPUS_DIR
    from chimein.data.dataset import build_dataset, publish_local

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHIMEIN_STORE", str(tmp_path / "store"))
    data = tmp_path / "chats.jsonl"
    data.write_text("".join((CORPUS_DIR / "part-0.jsonl").read_text().splitlines(keepends=True)[:10]))
    ds, info = build_dataset(data, test_fraction=0.3)
    publish_local(ds, info)
    r = CliRunner().invoke(app, ["eval", "--data", info.location, "--baseline", "base", "--preset",
                                 "tiny-chatml", "--limit", "1", "--no-track", "--out", "r.json"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["conversations"] == 1 and rep["data"] == info.location
    n_user = sum(m["role"] == "user" for m in ds["test"][0]["messages"])
    assert rep["systems"]["base"]["metrics"]["decisions"] == n_user
    r = CliRunner().invoke(app, ["eval", "--data", "local:ds-000000000000", "--baseline", "base",
                                 "--preset", "tiny-chatml", "--no-track"])
    assert r.exit_code == 1 and "no dataset" in r.output
