"""Parameters: profiles, overrides, and typos that fail at once with the valid choices."""

from __future__ import annotations

import pytest
import yaml

from diffattr.params import PROFILES, load, resolve, resolve_checkpoint_steps


def test_default_profile_is_digits_and_overrides_apply():
    p = resolve({"train": {"steps": 30}})
    assert p.profile == "digits" and p.data.dataset == "digits" and p.train.steps == 30
    q = resolve({"train": {"steps": 30}}, {"train": {"batch_size": 4}})
    assert q.train.steps == 30 and q.train.batch_size == 4


def test_profile_switches_the_whole_scale():
    p = resolve({"profile": "cifar2"})
    assert p.data.dataset == "cifar2" and p.model.unet == "ddpm_cifar10"
    assert p.train.steps == PROFILES["cifar2"]["train"]["steps"]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"profile": "cifar3"}, "cifar2"),
        ({"trian": {}}, "did you mean 'train'"),
        ({"train": {"stpes": 3}}, "did you mean 'steps'"),
        ({"model": {"loss": "l3"}}, "valid: l2, l1"),
        ({"data": {"dataset": "mnist"}}, "digits"),
        ({"train": {"steps": "many"}}, "integer"),
        ({"train": {"lr": "fast"}}, "number"),
        ({"train": {"checkpoints": [0, 5]}}, "checkpoints"),
        ({"train": {"checkpoints": 5.0}}, "integer"),
        ({"train": {"resume_every": 0}}, "≥ 1"),
        ({"train": {"steps": -3}}, "≥ 1"),
        ({"gradients": {"query_draws": 0}}, "≥ 1"),
        ({"train": {"ema_decay": 1.5}}, "< 1"),
        ({"gradients": {"checkpoints": [7]}}, "kept training checkpoints"),
    ],
)
def test_typos_fail_with_the_valid_choices(raw, fragment):
    with pytest.raises(ValueError, match=fragment):
        resolve(raw)


def test_yaml_exponent_strings_are_read_as_numbers():
    assert resolve({"train": {"lr": "2e-4"}}).train.lr == 2e-4
    assert resolve({"train": {"warmup_steps": 0}}).train.warmup_steps == 0


def test_checkpoint_count_is_evenly_spaced_and_ends_at_the_last_step():
    assert resolve_checkpoint_steps(4, 100) == [25, 50, 75, 100]
    assert resolve_checkpoint_steps([30, 10, 10], 100) == [10, 30]
    assert resolve_checkpoint_steps(10, 3) == [1, 2, 3]


def test_the_repository_params_file_resolves(tmp_path):
    p = load("params.yaml")
    assert p.profile == "digits"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"profile": "celeba"}))
    assert load(path).data.image_size == 64
    assert load(None).profile == "digits"


def test_a_named_params_file_that_does_not_exist_is_an_error_not_the_defaults(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"attribution": {"tau": 0}}, r"\(0, 1\]"),
        ({"attribution": {"sweep_tau": [0.5, 1.5]}}, r"sweep_tau\[1\]"),
        ({"attribution": {"band_quantile": 1}}, r"\(0, 1\)"),
        ({"attribution": {"sweep_k": [5, 0]}}, "positive integers"),
        ({"attribution": {"methods": ["tracn"]}}, "did you mean 'tracin'"),
        (
            {"attribution": {"methods": [{"method": "retrac", "args": {"side": "grid"}}]}},
            "unknown argument 'side'",
        ),
        ({"attribution": {"methods": ["tracin", "tracin"]}}, "unique"),
    ],
)
def test_attribution_settings_are_checked(raw, fragment):
    with pytest.raises(ValueError, match=fragment):
        resolve(raw)


# ---------------------------------------------------------------------------------------------
# Every check up front, naming its key


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"lds": {"dampings": "1e-3"}}, "lds.dampings must be a list"),
        ({"lds": {"dampings": ["small"]}}, r"lds.dampings\[0\] must be a number"),
        ({"lds": {"dampings": [0.0]}}, "lds.dampings must be finite numbers > 0"),
        ({"lds": {"dampings": [float("inf")]}}, "lds.dampings must be finite numbers > 0"),
        ({"lds": {"dampings": [-1e-3]}}, "lds.dampings must be finite numbers > 0"),
        ({"attribution": {"sweep_tau": 0.5}}, "attribution.sweep_tau must be a list"),
        ({"attribution": {"top_k": "10"}}, "attribution.top_k must be an integer"),
        ({"attribution": {"tau": "half"}}, "attribution.tau must be a number"),
        ({"train": {"lr": "fast"}}, "train.lr must be a number"),
        ({"train": {"checkpoints": ["a"]}}, r"train.checkpoints\[0\] must be a positive integer"),
        ({"train": {"checkpoints": [3.5]}}, r"train.checkpoints\[0\] must be a positive integer"),
        ({"retrain": {"fraction": "half"}}, "retrain.fraction must be a number"),
    ],
)
def test_strings_where_numbers_are_expected_fail_naming_the_key(raw, key):
    with pytest.raises(ValueError, match=key):
        resolve(raw)


def test_top_k_above_the_training_set_size_after_max_train_names_both():
    P = resolve({"data": {"max_train": 8}, "attribution": {"top_k": 10}})
    with pytest.raises(ValueError, match="attribution.top_k = 10 exceeds the 8 training") as info:
        P.check_dataset_size(len(P.data.load("train")))
    assert "data.max_train = 8" in str(info.value)
    P.check_dataset_size(10)  # equal is fine
