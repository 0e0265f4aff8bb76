"""trainer.compile: the decoder layers compiled by torch.compile (inductor, real C++ kernels) for
training, the same loss and gradients as eager, eager again afterwards; refused or skipped with a
clear message where it cannot work; not part of a run's identity. (Its speed is measured in
benchmarks/bench_train_step.py, not here.)"""

from __future__ import annotations

import logging

import pytest
import torch

from chimein.models.loading import load_base_model
from chimein.train import trainer as training
from chimein.train.config import load_train_config
from chimein.train.run import plan_run
from chimein.train.trainer import apply_lora, compiled_layers, decoder_layers
from tests.conftest import preset_and_tokenizer
from tests.unit.train.test_training import tiny_config, workdir  # noqa: F401 — the fixture


def _lora_model():
    preset, tok = preset_and_tokenizer("tiny-chatml")
    cfg = load_train_config(dataset="x", **{"quantization.load_in_4bit": False, "quantization.compute_dtype": "float32",
                                            "lora.dropout": 0.0, "lora.r": 8})
    torch.manual_seed(0)
    model = apply_lora(load_base_model(preset, cfg.quantization, tok, "eager"), preset, cfg.lora,
                       gradient_checkpointing=False)
    for name, p in model.named_parameters():  # LoRA's B starts at zero: make the adapter count
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


def _loss_and_grads(model, length: int):
    ids = torch.arange(5, 5 + length)[None] % model.config.vocab_size
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_layers_train_as_eager_does_and_are_eager_again_after():
    model = _lora_model()
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    eager = {n: _loss_and_grads(model, n) for n in (7, 13)}
    with compiled_layers(model, "layers"):
        assert all(layer._compiled_call_impl is not None for layer in layers)
        for n in (7, 13, 7):  # two lengths: shapes are dynamic, one graph serves both
            loss, grads = _loss_and_grads(model, n)
            torch.testing.assert_close(loss, eager[n][0], rtol=1e-4, atol=1e-5)
            assert grads.keys() == eager[n][1].keys() and grads
            for name, g in grads.items():
                torch.testing.assert_close(g, eager[n][1][name], rtol=1e-3, atol=1e-5)
    assert all(layer._compiled_call_impl is None for layer in layers)
    with torch.no_grad():  # inference with the KV cache runs eagerly again
        model.eval()(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)


def test_compile_off_or_without_a_compiler_trains_eagerly(monkeypatch, caplog):
    model = _lora_model()
    with compiled_layers(model, "off"):
        assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))
    monkeypatch.setattr(training.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING), compiled_layers(model, "layers"):
        assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))
    assert "no C++ compiler" in caplog.text and "training eagerly" in caplog.text


def test_a_model_without_decoder_layers_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match="trainer.compile: off"):
        with compiled_layers(torch.nn.Linear(4, 4), "layers"):
            pass


def test_compiling_is_not_part_of_the_run_identity(workdir):  # noqa: F811 — the fixture
    preset, _ = preset_and_tokenizer("tiny-chatml")
    names = {how: plan_run(tiny_config(**{"trainer.compile": how}), preset, "ds-x", resume=True).name
             for how in ("off", "layers")}
    assert names["off"] == names["layers"]
    other = plan_run(tiny_config(**{"trainer.learning_rate": 5e-4}), preset, "ds-x", resume=True).name
    assert other != names["off"]


def test_train_cli_sets_compiling_and_refuses_an_unknown_value(workdir, monkeypatch):  # noqa: F811 — the fixture
    from typer.testing import CliRunner

    from chimein.cli import app
    from chimein.train import launch

    seen = []

    def record(cfg, **kwargs):
        seen.append(cfg.trainer.compile)
        raise ValueError("stopped by the test before training")

    monkeypatch.setattr(launch, "train", record)
    args = ["train", "--preset", "tiny-chatml", "--dataset", "chats.jsonl", "--config", "offline-cpu"]
    r = CliRunner().invoke(app, args + ["--compile", "off"])
    assert "stopped by the test" in r.output and seen == ["off"]
    r = CliRunner().invoke(app, args)
    assert seen == ["off", "layers"]  # offline-cpu's own setting
    r = CliRunner().invoke(app, args + ["--compile", "sometimes"])
    assert r.exit_code != 0 and "compile" in r.output and "'layers'" in r.output and len(seen) == 2
