"""One pre-flight check before any work: the preset's hardware and the number of processes, as
`chimein train` and the retrain flow both run it (this machine has no CUDA)."""

from __future__ import annotations

import pytest
import torch

from chimein.presets import HardwareError
from chimein.train.config import load_train_config, preflight


def test_a_cpu_preset_passes_and_its_preset_comes_back():
    preset = preflight(load_train_config(model="tiny-chatml", dataset="x"))
    assert preset.name == "tiny-chatml"


def test_a_gpu_preset_is_refused_on_a_host_without_cuda_unless_allowed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_train_config(model="zephyr-7b-beta", dataset="x")
    with pytest.raises(HardwareError, match="needs a CUDA GPU"):
        preflight(cfg)
    assert preflight(cfg, allow_cpu=True).name == "zephyr-7b-beta"


def test_processes_that_do_not_divide_the_accumulation_are_refused():
    cfg = load_train_config(model="tiny-chatml", dataset="x",
                            **{"trainer.processes": 3, "trainer.gradient_accumulation_steps": 4})
    with pytest.raises(ValueError, match="3 processes cannot keep the global batch"):
        preflight(cfg)
