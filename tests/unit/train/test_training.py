"""QLoRA training on tiny models (CPU, 4-bit NF4), tracked in a real MLflow SQLite store."""

from __future__ import annotations

import logging
import math

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from transformers import TrainerCallback
from typer.testing import CliRunner

from chimein.cli import app
from chimein.data.corpus import CORPUS_DIR
from chimein.models import adapters
from chimein.models.loading import PadTokenError, load_adapter, load_base_model
from chimein.presets import load_preset
from chimein.train.config import load_train_config
from chimein.train.run import train
from chimein.train.trainer import (
    TrainingGuardError,
    apply_lora,
    check_labelled_tokens,
    loss_guard,
    progress_log,
)
from tests.conftest import preset_and_tokenizer

PROBE = "<|im_start|>user\nAna: who wrote Dune?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory: MLflow SQLite store, outputs and store all inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CHIMEIN_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("HF_TOKEN", "hf_secret_must_not_be_logged")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join((CORPUS_DIR / "part-0.jsonl").read_text().splitlines(keepends=True)[:12]))
    return tmp_path


def tiny_config(model="tiny-chatml", steps=3, **overrides):
    return load_train_config(model=model, dataset="chats.jsonl", max_length=256, **{
        "trainer.max_steps": steps, "trainer.per_device_train_batch_size": 2,
        "trainer.gradient_accumulation_steps": 1, "trainer.save_steps": 2, "lora.r": 8,
        "trainer.learning_rate": 1e-3, **overrides})


class Snapshot(TrainerCallback):
    """Weights before and after training, and the trained model's logits on a probe."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {k: v.detach().clone() for k, v in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.after = {k: v.detach().clone() for k, v in model.named_parameters()}
        self.trainable = {k for k, v in model.named_parameters() if v.requires_grad}
        ids = processing_class(PROBE, add_special_tokens=False, return_tensors="pt").input_ids
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=ids).logits


def test_training_logs_to_mlflow_moves_only_lora_and_reloads(workdir, capfd):
    snap = Snapshot()
    result = train(tiny_config(), progress=False, callbacks=[snap])
    assert result.steps == 3 and math.isfinite(result.final_loss) and result.labelled_tokens > 0
    # without progress bars the Trainer printed every log as a raw dict (into the flow's log too)
    assert "{'loss'" not in capfd.readouterr().out

    # only LoRA weights train, and they moved; the 4-bit base is frozen and unchanged
    assert snap.trainable and all("lora_" in k for k in snap.trainable)
    assert any(not torch.equal(snap.before[k], snap.after[k]) for k in snap.trainable if "lora_B" in k)
    frozen = [k for k in snap.before if k not in snap.trainable]
    assert frozen and all(torch.equal(snap.before[k], snap.after[k]) for k in frozen)

    # a real MLflow store: params, per-step metrics, tags, artifacts, a registered model
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.run_name == result.run_name
    assert result.run_name.startswith(f"tiny-chatml--{result.dataset_version}--")
    p = run.data.params
    assert (p["preset.name"], p["lora.r"], p["trainer.learning_rate"], p["data.version"]) == \
        ("tiny-chatml", "8", "0.001", result.dataset_version)
    assert "hf_secret" not in str(p) + str(run.data.tags)
    loss = client.get_metric_history(result.run_id, "loss")
    assert [m.step for m in sorted(loss, key=lambda m: m.step)] == [1, 2, 3]
    for name in ("grad_norm", "learning_rate", "epoch", "train_loss", "data.labelled_tokens"):
        assert name in run.data.metrics, name
    assert run.data.metrics["train_loss"] == pytest.approx(result.final_loss)
    assert run.data.metrics["data.labelled_tokens"] == result.labelled_tokens
    t = run.data.tags
    assert (t["chimein.family"], t["chimein.preset"], t["chimein.dataset_version"], t["chimein.device"]) == \
        ("chatml", "tiny-chatml", result.dataset_version, "cpu")
    assert t["chimein.git_commit"] and t["chimein.compute_dtype"] == "float32"
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"adapter", "config", "examples.txt", "loss_curve.png"} <= artifacts
    assert "adapter/adapter_model.safetensors" in {a.path for a in client.list_artifacts(result.run_id, "adapter")}
    assert result.registered == "chimein-tiny-chatml/1"
    assert client.get_model_version("chimein-tiny-chatml", "1").run_id == result.run_id

    # base + adapter, loaded back from the local store, give the logits seen right after training
    ref = adapters.publish_local(result.adapter_dir, result.run_name)
    model, tok = load_adapter(ref)
    ids = tok(PROBE, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, snap.logits, atol=1e-4, rtol=1e-4)
    card = (workdir / "store" / "adapters" / result.run_name / "README.md").read_text()
    assert "base_model: " in card and result.dataset_version in card and "lora.r | 8" in card


class CrashAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("adapter_dtype", ["auto", "bfloat16"])  # fp32 on CPU; bf16 as on GPUs
def test_resume_continues_the_same_run_and_matches_an_uninterrupted_one(workdir, adapter_dtype):
    def config(out):
        return tiny_config(steps=4, output_dir=out, **{"lora.adapter_dtype": adapter_dtype})

    whole = train(config("whole"), progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config("crashed"), progress=False, callbacks=[CrashAt(3)])
    with pytest.raises(FileExistsError, match="--resume"):
        train(config("crashed"), progress=False)
    resumed = train(config("crashed"), resume=True, progress=False)
    assert resumed.resumed_from.endswith("checkpoint-2") and resumed.steps == 4

    a = load_file(whole.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)

    client = MlflowClient(resumed.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("chimein").experiment_id])
    assert sum(r.info.run_name == resumed.run_name for r in runs) == 2  # whole + crashed/resumed
    steps = sorted(m.step for m in client.get_metric_history(resumed.run_id, "loss"))
    assert steps == [1, 2, 3, 4]
    again = train(config("crashed"), resume=True, progress=False)
    assert again.finished_earlier and again.run_id == resumed.run_id
    assert again.registered == resumed.registered is not None


class CrashAfterLogging(TrainerCallback):
    """Killed after the step's loss reached MLflow, before the next checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step == self.step and "loss" in (logs or {}):
            raise RuntimeError("simulated crash")


def test_a_resumed_run_says_where_it_resumed_and_logs_each_step_once(workdir, caplog):
    cfg = tiny_config(steps=4, output_dir="crashed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, progress=False, callbacks=[CrashAfterLogging(3)])  # step 3 logged, checkpoint-2 kept
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run_id = next(workdir.glob("crashed/*/mlflow_run_id")).read_text()
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3]
    log = logging.getLogger("test.resume")
    with caplog.at_level(logging.INFO, logger="test.resume"):
        resumed = train(cfg, resume=True, progress=False, callbacks=[progress_log(log)])
    lines = [r.getMessage() for r in caplog.records if r.name == "test.resume"]
    assert lines[0] == "resumed from checkpoint-2: step 2 of 4 done, 2 to go", lines
    assert resumed.run_id == run_id
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4]  # 3 once


class PoisonLora(TrainerCallback):
    """The divergence trap: LoRA weights go NaN after the first step."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_A" in name:
                        p.fill_(float("nan"))


def test_nan_loss_stops_training_naming_the_dtype(workdir):
    with pytest.raises(TrainingGuardError, match=r"3 consecutive steps .*bfloat16.*float32"):
        train(tiny_config(steps=8), progress=False, callbacks=[PoisonLora()])


def test_loss_guard_counts_consecutive_zero_losses():
    guard = loss_guard(3, "torch.float16")
    for loss in (0.0, 0.0, 1.2, 0.0, 0.0):
        guard.on_log(None, None, None, logs={"loss": loss})
    with pytest.raises(TrainingGuardError, match="was 0.0 for 3 consecutive steps .*float16"):
        guard.on_log(None, None, None, logs={"loss": 0.0})


def test_zero_labelled_tokens_are_refused(workdir, monkeypatch):
    with pytest.raises(TrainingGuardError, match="zero labelled tokens"):
        check_labelled_tokens({"assistant_masks": [[0, 0, 0], [0]]})
    import chimein.data.preprocess

    real = chimein.data.preprocess.tokenize_conversations

    def unlabelled(*args, **kwargs):
        rows, rejected, examples = real(*args, **kwargs)
        rows["assistant_masks"] = [[0] * len(m) for m in rows["assistant_masks"]]
        return rows, rejected, examples

    monkeypatch.setattr(chimein.data.preprocess, "tokenize_conversations", unlabelled)
    with pytest.raises(TrainingGuardError, match="zero labelled tokens"):
        train(tiny_config(), progress=False)
    assert not (workdir / "mlflow.db").exists()  # refused before any run or model load


def test_pad_equal_to_eos_is_refused(workdir):
    bad = workdir / "pad-is-eos.yaml"
    bad.write_text((load_preset("tiny-chatml").model_dump_json()))
    text = bad.read_text().replace('"pad_token":"unk"', '"pad_token":"<|im_end|>"')
    bad.write_text(text)
    with pytest.raises(PadTokenError, match="pad token equals EOS"):
        train(tiny_config(model=str(bad)), progress=False)


def test_gradient_checkpointing_with_peft_needs_input_grads():
    """The trap is real — checkpointing switched on under a PEFT model whose inputs do not require
    grad fails in backward — and apply_lora sets input grads so it cannot happen. (transformers 5
    and peft guard their own enabling calls; the layer switch below bypasses both, as a custom
    training loop or an older version does.)"""
    from functools import partial

    from peft import LoraConfig, get_peft_model
    from torch.utils.checkpoint import checkpoint

    preset, tok = preset_and_tokenizer("tiny-llama-2")
    quant = load_train_config(dataset="x").quantization.model_copy(update={"load_in_4bit": False})
    ids = torch.tensor([[1, 518, 25580, 29962, 22172]])

    def switch_on_checkpointing(peft_model):
        peft_model.base_model.model._set_gradient_checkpointing(
            enable=True, gradient_checkpointing_func=partial(checkpoint, use_reentrant=True))
        peft_model.train()
        return peft_model

    bare = switch_on_checkpointing(get_peft_model(
        load_base_model(preset, quant, tok), LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")))
    with pytest.raises(RuntimeError, match="does not require grad"):
        bare(input_ids=ids, labels=ids).loss.backward()

    fixed = switch_on_checkpointing(apply_lora(load_base_model(preset, quant, tok), preset,
                                               load_train_config(dataset="x").lora, gradient_checkpointing=True))
    fixed(input_ids=ids, labels=ids).loss.backward()
    assert any(p.grad is not None for n, p in fixed.named_parameters() if "lora_" in n)


def test_train_cli(workdir):
    r = CliRunner().invoke(app, ["train", "--preset", "tiny-zephyr", "--dataset", "chats.jsonl",
                                 "--max-steps", "1", "--config", str(_cli_config(workdir))])
    assert r.exit_code == 0, r.output
    assert "MLflow run" in r.output and "mlflow ui --backend-store-uri sqlite:///" in r.output
    assert "local:tiny-zephyr--ds-" in r.output
    assert mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").search_registered_models()


def _cli_config(workdir):
    path = workdir / "train.yaml"
    path.write_text("dataset: chats.jsonl\nmax_length: 256\nlora: {r: 8}\n"
                    "trainer: {per_device_train_batch_size: 2, gradient_accumulation_steps: 1}\n")
    return path


@pytest.mark.slow
def test_smollm2_trains_a_few_steps(workdir):
    snap = Snapshot()
    result = train(load_train_config(model="smollm2-135m-instruct", dataset="chats.jsonl",
                                     max_length=384, **{"trainer.max_steps": 2, "lora.r": 8,
                                                        "trainer.per_device_train_batch_size": 2,
                                                        "trainer.gradient_accumulation_steps": 1}),
                   progress=False, callbacks=[snap])
    assert result.steps == 2 and math.isfinite(result.final_loss)
    assert result.final_loss < 6  # a real instruct model, not random weights (~10.8)
    assert any(not torch.equal(snap.before[k], snap.after[k]) for k in snap.trainable if "lora_B" in k)


HUB_ADAPTER = """
import json, sys, torch
from chimein.models import adapters
from chimein.models.loading import load_adapter
ref = adapters.publish_hub(sys.argv[1], "org/chimein-adapter") if sys.argv[2] == "push" else "hub:org/chimein-adapter"
model, tok = load_adapter(ref)
ids = tok(sys.argv[3], add_special_tokens=False, return_tensors="pt").input_ids
with torch.no_grad():
    print(json.dumps({"ref": ref, "logits": model(input_ids=ids).logits[0, -1, :50].tolist()}))
"""


def test_adapter_round_trip_through_the_hub(workdir):
    import json
    import os
    import subprocess
    import sys

    from tests.fakes.fake_hub import FakeHub

    result = train(tiny_config(steps=2), progress=False)
    local_model, tok = load_adapter(str(result.adapter_dir))
    ids = tok(PROBE, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = local_model(input_ids=ids).logits[0, -1, :50]
    with FakeHub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(workdir / "hf"),
               "HF_HUB_DISABLE_XET": "1"}  # the fake speaks git-lfs, not Xet
        for step in ("push", "load"):
            proc = subprocess.run([sys.executable, "-c", HUB_ADAPTER, str(result.adapter_dir), step, PROBE],
                                  env=env, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            torch.testing.assert_close(torch.tensor(out["logits"]), expected, atol=1e-4, rtol=1e-4)
        repo = hub.repos[("model", "org/chimein-adapter")]
        _, files = repo.snapshot("main")
    assert out["ref"] == "hub:org/chimein-adapter" and repo.private
    assert {"adapter_model.safetensors", "adapter_config.json", "chimein.json", "README.md",
            "tokenizer.json"} <= set(files)
    card = files["README.md"].decode()
    assert result.dataset_version in card and "base_model:" in card
    assert b"hf_secret" not in b"".join(files.values())


def test_assistant_loads_the_registered_champion_from_mlflow(workdir):
    from chimein.runtime.assistant import GroupChatAssistant

    result = train(tiny_config(steps=1), progress=False)
    name, version = result.registered.rsplit("/", 1)
    client = MlflowClient(result.tracking_uri)
    client.set_registered_model_alias(name, "champion", version)
    bot = GroupChatAssistant.from_adapter(f"models:/{name}@champion")
    reference, _ = load_adapter(str(result.adapter_dir))
    assert bot.preset.name == "tiny-chatml"
    for (n1, p1), (n2, p2) in zip(bot.model.named_parameters(), reference.named_parameters()):
        if "lora_" in n1:
            assert n1 == n2 and torch.equal(p1, p2)
    d = bot.add("Ana", "hi")
    assert 0 <= d.p_speak <= 1
