"""The speak/silence decision in training: its tokens, the weighted loss, and the calibrated
chattiness threshold saved with the adapter."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from chimein.conversation import parse_conversation
from chimein.evaluate.metrics import calibrate_threshold, decision_metrics
from chimein.formatting import encode
from tests.conftest import preset_and_tokenizer
from tests.unit.train.test_training import tiny_config, workdir  # noqa: F401 — the fixture

CHAT = parse_conversation([
    {"role": "user", "name": "Ana", "content": "who wrote Dune again?"},
    {"role": "assistant", "content": "Frank Herbert, in 1965."},
    {"role": "user", "name": "Ben", "content": "ah right"},
    {"role": "user", "name": "Ana", "content": "ok see you at 8"},
])


def runs(mask: list[int]) -> list[tuple[int, int]]:
    out, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_decision_tokens_are_the_labels_and_a_silent_turns_end(family):
    preset, tok = family
    ex = encode(CHAT, tok, preset)
    assert all(a >= d for a, d in zip(ex.assistant_masks, ex.decision_masks))  # a subset of the labels
    texts = [tok.decode(ex.input_ids[s:e]) for s, e in runs(list(ex.decision_masks))]
    assert len(texts) == 3  # one decision per user message
    assert texts[0].strip() == "(response)"
    for silent in texts[1:]:
        assert silent.strip().startswith("(silence)") and silent.rstrip().endswith(preset.eot_token)
    # the reply text itself is labelled but is not a decision
    reply = [i for i, (a, d) in enumerate(zip(ex.assistant_masks, ex.decision_masks)) if a and not d]
    assert "Frank Herbert" in tok.decode([ex.input_ids[i] for i in reply])


def _trainer(cfg, weighted: bool):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from chimein.data.preprocess import PreprocessSummary, tokenize_conversations
    from chimein.models.loading import load_base_model
    from chimein.train.trainer import apply_lora, decision_weighted_trainer

    preset, tok = preset_and_tokenizer(cfg.model)
    rows, _, _ = tokenize_conversations([CHAT, CHAT], [1, 2], "t", preset, tok,
                                        PreprocessSummary(preset.name, "t", "", 256))
    cols = ("input_ids", "assistant_masks") + (("decision_masks",) if weighted else ())
    torch.manual_seed(0)
    model = apply_lora(load_base_model(preset, cfg.quantization, tok), preset, cfg.lora, False)
    args = SFTConfig(output_dir="out", per_device_train_batch_size=2, report_to="none", use_cpu=True,
                     max_length=256, bf16=False)
    kwargs = {"model": model, "args": args, "processing_class": tok,
              "train_dataset": Dataset.from_dict({k: rows[k] for k in cols})}
    make = (lambda **kw: decision_weighted_trainer(cfg.loss.decision_weight, **kw)) if weighted else SFTTrainer
    trainer = make(**kwargs)
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, model, batch, tok


def test_weight_one_is_trls_own_loss(workdir):
    cfg = tiny_config(**{"quantization.load_in_4bit": False})
    trl_trainer, model, batch, _ = _trainer(cfg, weighted=False)
    ours, model2, batch2, _ = _trainer(cfg, weighted=True)  # decision_weight 1.0
    model2.load_state_dict(model.state_dict())
    model.eval(), model2.eval()  # no dropout: the same forward
    expected = trl_trainer.compute_loss(model, dict(batch))
    assert ours.compute_loss(model2, dict(batch2)).item() == pytest.approx(expected.item(), rel=1e-5)


def test_decision_weight_reweights_exactly_the_decision_tokens(workdir):
    cfg = tiny_config(**{"quantization.load_in_4bit": False, "loss.decision_weight": 5.0})
    trainer, model, batch, _ = _trainer(cfg, weighted=True)
    model.eval()
    loss = trainer.compute_loss(model, dict(batch)).item()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                         batch["labels"][:, 1:].reshape(-1), reduction="none", ignore_index=-100)
    labelled = batch["labels"][:, 1:].reshape(-1) != -100
    decision = batch["decision_masks"][:, 1:].reshape(-1).bool() & labelled
    assert decision.any() and (labelled & ~decision).any()
    w = 1 + 4 * decision.float()
    manual = (ce[labelled] * w[labelled]).sum() / w[labelled].sum()
    assert loss == pytest.approx(manual.item(), rel=1e-4)
    assert loss != pytest.approx(ce[labelled].mean().item(), rel=1e-3)  # the weight changes it


def test_calibrated_threshold_maximises_balanced_accuracy():
    labels = [True, True, False, False, False, False]
    scores = [0.30, 0.20, 0.25, 0.05, 0.02, 0.01]
    t, m = calibrate_threshold(labels, scores)
    assert 0.25 < t < 0.30 or 0.05 < t < 0.20  # both cut one error; a cut never sits on a score
    assert m["balanced_accuracy"] == pytest.approx(0.875)
    best_fixed = max(decision_metrics(labels, [s >= x for s in scores])["balanced_accuracy"]
                     for x in (0.5, 0.3, 0.2, 0.05))
    assert m["balanced_accuracy"] >= best_fixed
    t, m = calibrate_threshold([True, False], [0.9, 0.1])
    assert 0.1 < t < 0.9 and m["balanced_accuracy"] == 1.0


def test_calibration_can_bound_false_interruptions():
    labels = [True] * 4 + [False] * 10
    scores = [0.9, 0.8, 0.6, 0.3] + [0.7, 0.5, 0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.02, 0.01]
    free, m_free = calibrate_threshold(labels, scores)
    assert m_free["false_interruption_rate"] == pytest.approx(0.3)  # speaks at 0.3: BA 0.85
    bounded, m = calibrate_threshold(labels, scores, max_fir=0.1)
    assert bounded > free and m["false_interruption_rate"] <= 0.1
    assert m["balanced_accuracy"] == pytest.approx(max(
        decision_metrics(labels, [s >= t for s in scores])["balanced_accuracy"]
        for t in (0.95, 0.85, 0.75, 0.65, 0.55) if
        decision_metrics(labels, [s >= t for s in scores])["false_interruption_rate"] <= 0.1))
    never, m = calibrate_threshold([True, False], [0.1, 0.9], max_fir=0.0)  # only by never speaking
    assert never > 0.9 and m["false_interruption_rate"] == 0


def test_training_calibrates_and_the_runtime_uses_it(workdir, tmp_path):
    from chimein.data.dataset import build_dataset, publish_local
    from chimein.runtime.assistant import GroupChatAssistant
    from chimein.train.run import train

    data = tmp_path / "chats.jsonl"
    ds, info = build_dataset(data, test_fraction=0.2, validation_fraction=0.3)
    publish_local(ds, info)
    result = train(tiny_config(steps=1).model_copy(update={"dataset": info.location}), progress=False)
    meta = json.loads((result.adapter_dir / "chimein.json").read_text())
    calibrated = meta["chattiness"]
    assert calibrated["source"] == f"calibrated on {info.version}:validation, false interruptions <= 0.03"
    assert calibrated["decisions"] == sum(len([m for m in c if m["role"] == "user"])
                                          for c in ds["validation"]["messages"])
    bot = GroupChatAssistant.from_adapter(str(result.adapter_dir))
    assert bot.chattiness == calibrated["threshold"] and bot.threshold.source == calibrated["source"]
    assert bot.threshold.origin == calibrated["origin"] == "calibrated"
    assert GroupChatAssistant.from_adapter(str(result.adapter_dir), chattiness=0.7).chattiness == 0.7
    # the confidence threshold: calibrated on the validation replies that state a checkable fact
    from chimein.evaluate.answers import reference_keys

    confidence = meta["confidence"]
    keyed = sum(bool(reference_keys(m["content"], " ".join(x["content"] for x in c[:i])))
                for c in ds["validation"]["messages"] for i, m in enumerate(c)
                if m["role"] == "assistant" and i and c[i - 1]["role"] == "user")
    assert keyed and confidence["replies"] == keyed and confidence["origin"] == "calibrated"
    assert confidence["source"] == f"calibrated on {info.version}:validation, confident errors <= 0.1"
    assert confidence["confident_errors"] <= 0.1 and 0 <= confidence["said_plainly"] <= 1
    assert bot.confidence.threshold == confidence["threshold"] and bot.confidence.origin == "calibrated"

    # re-scoring an adapter on the benchmark records bench.* on its own training run
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from chimein.cli import app
    from chimein.evaluate.benchmark import load_benchmark

    r = CliRunner().invoke(app, ["eval", "--adapter", str(result.adapter_dir), "--no-replies", "--no-track",
                                 "--log-to-run", "--out", str(tmp_path / "report.json")])
    assert r.exit_code == 0, r.output
    tags = MlflowClient(result.tracking_uri).get_run(result.run_id).data.tags
    assert tags["bench.fingerprint"] == load_benchmark().fingerprint and tags["bench.complete"] == "true"
    assert tags["bench.chattiness_source"] == "calibrated"
    assert float(tags["bench.chattiness"]) == pytest.approx(calibrated["threshold"])


def test_lora_on_the_top_layers_only_leaves_the_rest_untouched(workdir):
    from chimein.models.loading import load_base_model
    from chimein.train.trainer import apply_lora

    cfg = tiny_config(**{"quantization.load_in_4bit": False, "lora.top_layers": 1})
    preset, tok = preset_and_tokenizer(cfg.model)
    model = apply_lora(load_base_model(preset, cfg.quantization, tok), preset, cfg.lora, False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.1." in n and "lora_" in n for n in trainable)
