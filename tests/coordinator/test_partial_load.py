"""Partial loads in one process: some components, some keys of one; the result says what was not loaded."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from dcp_forge import CheckpointCoordinator, MissingComponentError, StateComponent, read_manifest
from dcp_forge.statefuls import ModelState, OptimizerState
from tests.support.statefuls import Counter

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def trained(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def comps(model, opt, counter):
    return [StateComponent("model", ModelState(model), "global"),
            StateComponent("optimizer", OptimizerState(model, opt), "global"),
            StateComponent("trainer", counter, "global")]


@pytest.fixture
def saved(tmp_path):
    model, opt = trained(0)
    path = CheckpointCoordinator(comps(model, opt, Counter(7)), output_dir=tmp_path).save_checkpoint(
        checkpoint_id="c")
    return path, model, opt


def test_model_only_for_evaluation(saved):
    path, model, _ = saved
    fresh, opt = trained(1)
    before = {k: v.clone() for k, v in OptimizerState(fresh, opt).state_dict()["state"]["0.weight"].items()}
    counter = Counter()
    result = CheckpointCoordinator(comps(fresh, opt, counter)).load_checkpoint(path, components=["model"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(),
                                                  strict=True))
    assert result.loaded == ("model",) and not result.complete
    assert result.not_loaded == {"optimizer": "not selected (components=)", "trainer": "not selected (components=)"}
    assert counter.step == 0
    after = OptimizerState(fresh, opt).state_dict()["state"]["0.weight"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # untouched
    assert "not loaded: optimizer (not selected (components=)); trainer" in result.summary()


def test_only_some_keys_of_a_component(saved):
    path, model, _ = saved
    fresh, opt = trained(1)
    kept = {k: v.clone() for k, v in fresh.state_dict().items()}
    result = CheckpointCoordinator(comps(fresh, opt, Counter())).load_checkpoint(path, keys={"model": ["0.*"]})
    assert torch.equal(fresh[0].weight, model[0].weight) and torch.equal(fresh[0].bias, model[0].bias)
    assert torch.equal(fresh[2].weight, kept["2.weight"]) and torch.equal(fresh[2].bias, kept["2.bias"])
    assert result.keys_not_loaded == {"model": ("2.bias", "2.weight")}
    assert result.loaded == ("model", "optimizer", "trainer") and not result.not_loaded


def test_keys_of_a_fresh_optimizer_that_has_no_state_yet(saved):
    path, model, saved_opt = saved
    torch.manual_seed(1)
    fresh = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    result = CheckpointCoordinator(comps(fresh, opt, Counter())).load_checkpoint(
        path, components=["optimizer"], keys={"optimizer": ["state.0.weight.*", "param_groups.*"]})
    expected = OptimizerState(model, saved_opt).state_dict()["state"]["0.weight"]
    got = OptimizerState(fresh, opt).state_dict()["state"]
    assert torch.equal(got["0.weight"]["exp_avg"], expected["exp_avg"])
    assert not torch.equal(got["2.weight"]["exp_avg_sq"], OptimizerState(model, saved_opt).state_dict()[
        "state"]["2.weight"]["exp_avg_sq"])
    assert "state.2.weight.exp_avg" in result.keys_not_loaded["optimizer"]


def test_a_key_pattern_that_matches_nothing_is_an_error(saved):
    path, _, _ = saved
    fresh, opt = trained(1)
    with pytest.raises(MissingComponentError, match=r"component 'model' on rank 0: key pattern\(s\) \['layers.\*'\] "
                                                     r"match no key"):
        CheckpointCoordinator(comps(fresh, opt, Counter())).load_checkpoint(path, keys={"model": ["layers.*"]})


def test_result_is_path_like_and_logged(saved, caplog):
    path, _, _ = saved
    fresh, opt = trained(1)
    with caplog.at_level(logging.INFO, logger="dcp_forge.coordinator"):
        result = CheckpointCoordinator(comps(fresh, opt, Counter())).load_checkpoint(path)
    assert os.fspath(result) == path and str(result) == path and result.complete
    assert result.bytes_read > 0 and result.read_once is False
    assert f"rank 0: loaded {path}: model, optimizer, trainer" in caplog.text
    manifest = read_manifest(result)
    assert manifest.describe_topology() == "world_size=1, nodes=1" and manifest.groups == {}


def test_inspect_shows_the_saved_topology(saved, capsys):
    from dcp_forge.cli import main

    assert main(["inspect", saved[0]]) == 0
    assert "saved topology: world_size=1, nodes=1" in capsys.readouterr().out
