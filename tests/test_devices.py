"""Device choice and the CUDA determinism flags (checked on the CPU: they are plain settings)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import kept_determinism

from diffattr import devices
from diffattr.devices import (
    CUBLAS_WORKSPACE,
    CUBLAS_WORKSPACE_ENV,
    DETERMINISM_ENV,
    determinism_settings,
    deterministic_cuda,
    resolve_device,
)
from diffattr.stages.train import write_metrics


@pytest.fixture
def clean_flags(monkeypatch):
    """Flags off and no CUBLAS_WORKSPACE_CONFIG, as in a fresh process; restored afterwards."""
    with kept_determinism():
        monkeypatch.delenv(CUBLAS_WORKSPACE_ENV, raising=False)
        monkeypatch.delenv(DETERMINISM_ENV, raising=False)
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
        yield


def test_deterministic_cuda_sets_every_flag_strictly_and_the_cublas_workspace(clean_flags):
    settings = deterministic_cuda()
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()  # strict
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ[CUBLAS_WORKSPACE_ENV] == CUBLAS_WORKSPACE == ":4096:8"
    assert settings == determinism_settings()
    assert settings["deterministic_algorithms"] and not settings["deterministic_warn_only"]
    assert settings[CUBLAS_WORKSPACE_ENV] == ":4096:8"
    assert settings["torch"] == torch.__version__ and settings["cuda"] == torch.version.cuda


def test_strict_mode_refuses_an_operation_without_a_deterministic_kernel(clean_flags):
    deterministic_cuda()
    with pytest.raises(RuntimeError, match="deterministic"):
        torch.zeros(4).put_(torch.tensor([0, 0]), torch.ones(2))  # put_(accumulate=False)


def test_warn_only_on_request_and_a_users_cublas_setting_is_kept(clean_flags, monkeypatch):
    monkeypatch.setenv(CUBLAS_WORKSPACE_ENV, ":16:8")
    deterministic_cuda(warn_only=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ[CUBLAS_WORKSPACE_ENV] == ":16:8"
    with pytest.warns(UserWarning, match="deterministic"):
        torch.zeros(4).put_(torch.tensor([0, 0]), torch.ones(2))


def test_the_fixture_restores_the_flags_for_the_tests_after_it():
    before = determinism_settings()
    with kept_determinism():
        deterministic_cuda()
    assert determinism_settings() == before


def test_resolving_a_cuda_device_switches_the_flags_on(clean_flags, monkeypatch):
    """What every stage does: resolve_device → deterministic_cuda (a GPU faked on the CPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ[CUBLAS_WORKSPACE_ENV] == CUBLAS_WORKSPACE
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("mode", ["warn", "off", "loose"])
def test_the_environment_chooses_warn_only_or_no_flags(clean_flags, monkeypatch, mode):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv(DETERMINISM_ENV, mode)
    if mode == "loose":
        with pytest.raises(ValueError, match="strict, warn, off"):
            resolve_device("cuda")
        return
    resolve_device("cuda")
    assert torch.are_deterministic_algorithms_enabled() is (mode == "warn")
    assert torch.is_deterministic_algorithms_warn_only_enabled() is (mode == "warn")
    assert determinism_settings()[DETERMINISM_ENV] == mode


def test_resolving_the_cpu_changes_no_flag(clean_flags, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert not torch.are_deterministic_algorithms_enabled()
    assert CUBLAS_WORKSPACE_ENV not in os.environ


def test_unknown_or_absent_devices_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_stage_metrics_record_the_runtime(tmp_path, clean_flags):
    deterministic_cuda()
    written = json.loads(write_metrics(tmp_path, {"steps": 3}).read_text())
    assert written["steps"] == 3
    assert written["runtime"] == json.loads(json.dumps(devices.determinism_settings()))
    assert written["runtime"]["deterministic_algorithms"] is True
