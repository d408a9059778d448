"""Legacy state providers (``get_statefuls_for_save`` / ``get_statefuls_for_load``) checkpoint through
dcp_forge with the patterns the migration guide implies, and load only what their load dict names."""

from __future__ import annotations

import random

import pytest
import torch

from dcp_forge import RNGState, SharingPattern, StateComponent, read_manifest
from dcp_forge.errors import ComponentDeclarationError, DeclarationTypeError
from dcp_forge.integrations.legacy import (
    components_from_provider,
    coordinator_from_provider,
    load_keys,
    process_groups_from_provider,
)


class LegacyTrainer:
    """The shape of the migration guide's "Before" trainer: flags decide what is saved and loaded."""

    def __init__(self, seed: int, save_scheduler_state: bool = True, load_scheduler_state: bool = True) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(4, 3)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)
        self.lr_scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=0.5)
        self.rng = RNGState()
        self.save_scheduler_state = save_scheduler_state
        self.load_scheduler_state = load_scheduler_state

    def step(self) -> None:
        loss = self.model(torch.randn(2, 4)).square().sum()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.lr_scheduler.step()

    def get_statefuls_for_save(self) -> dict:
        statefuls = {"model": self.model, "optimizer": self.optimizer, "rng": self.rng}
        if self.save_scheduler_state:
            statefuls["scheduler"] = self.lr_scheduler
        return statefuls

    def get_statefuls_for_load(self) -> dict:
        statefuls = {"model": self.model, "optimizer": self.optimizer, "rng": RNGState()}
        if self.load_scheduler_state:
            statefuls["scheduler"] = self.lr_scheduler
        return statefuls


def assert_same_training_state(a: LegacyTrainer, b: LegacyTrainer) -> None:
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for index, moments in sa["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, sb["state"][index][name]), (index, name)


def test_legacy_patterns_follow_the_migration_guide():
    trainer = LegacyTrainer(0, load_scheduler_state=False)
    components = {c.key: c for c in components_from_provider(trainer)}
    assert {k: c.sharing_pattern for k, c in components.items()} == {
        "model": SharingPattern.REPLICATED, "optimizer": SharingPattern.REPLICATED,
        "rng": SharingPattern.PER_RANK, "scheduler": SharingPattern.REPLICATED}
    assert components["model"].stateful is trainer.model
    assert not components["scheduler"].required  # saved, but the load dict leaves it out
    assert all(c.required for k, c in components.items() if k != "scheduler")
    assert load_keys(trainer) == ["model", "optimizer", "rng"]
    overridden = components_from_provider(trainer, patterns={"optimizer": "per_rank"})
    assert {c.key: c.sharing_pattern for c in overridden}["optimizer"] is SharingPattern.PER_RANK
    assert process_groups_from_provider(trainer) == {}


def test_legacy_provider_round_trip_is_exact_and_loads_only_the_load_dict(tmp_path):
    trainer = LegacyTrainer(0)
    for _ in range(3):
        trainer.step()
    with coordinator_from_provider(trainer, tmp_path) as coord:
        path = coord.save_checkpoint(checkpoint_id="checkpoint-3")
    expected_draws = (torch.randn(3), random.random())  # what the RNGs give right after the save point
    torch.manual_seed(99)
    random.seed(99)

    resumed = LegacyTrainer(1, load_scheduler_state=False)
    with coordinator_from_provider(resumed, tmp_path) as coord:
        result = coord.load_checkpoint(path, components=load_keys(resumed))
    assert set(result.loaded) == {"model", "optimizer", "rng"}
    assert_same_training_state(trainer, resumed)
    draws = (torch.randn(3), random.random())
    assert torch.equal(draws[0], expected_draws[0]) and draws[1] == expected_draws[1]  # the RNGs came back...
    assert resumed.lr_scheduler.last_epoch == 0  # ...the scheduler, outside the load dict, did not

    # Continuing both from the checkpoint gives the same run.
    original = LegacyTrainer(2)
    with coordinator_from_provider(original, tmp_path) as coord:
        coord.load_checkpoint(path)
    assert original.lr_scheduler.last_epoch == 3
    original.step()
    again = LegacyTrainer(3)
    with coordinator_from_provider(again, tmp_path) as coord:
        coord.load_checkpoint(path)
    again.step()
    assert_same_training_state(original, again)


def test_new_api_wins_over_the_legacy_one():
    class Both(LegacyTrainer):
        def get_state_components(self):
            return [StateComponent("model", self.model, SharingPattern.GLOBAL)]

    both = Both(0)
    assert [(c.key, c.sharing_pattern) for c in components_from_provider(both)] == [("model", SharingPattern.GLOBAL)]
    assert load_keys(both) is None
    with pytest.raises(ComponentDeclarationError, match="only applies to legacy providers"):
        components_from_provider(both, patterns={"model": "replicated"})

    class NewApiDeclines(LegacyTrainer):  # the guide: "use old API if new methods return None"
        def get_state_components(self):
            return None

    assert [c.key for c in components_from_provider(NewApiDeclines(0))] == ["model", "optimizer", "rng", "scheduler"]


@pytest.mark.parametrize(("provider", "error", "match"), [
    (object(), DeclarationTypeError, "no state provider"),
    (type("Bad", (), {"get_statefuls_for_save": lambda self: [1]})(), DeclarationTypeError, "must return a dict"),
    (type("LoadsMore", (), {"get_statefuls_for_save": lambda self: {},
                            "get_statefuls_for_load": lambda self: {"model": torch.nn.Linear(1, 1)}})(),
     ComponentDeclarationError, r"\['model'\] are in get_statefuls_for_load\(\)"),
])
def test_bad_providers_are_refused_with_a_clear_error(provider, error, match):
    with pytest.raises(error, match=match):
        components_from_provider(provider)


def test_a_load_dict_with_other_objects_is_refused():
    trainer = LegacyTrainer(0)
    other = torch.nn.Linear(4, 3)
    trainer.get_statefuls_for_load = lambda: {"model": other}
    with pytest.raises(ComponentDeclarationError, match=r"get_statefuls_for_load\(\)\['model'\] is a different object"):
        components_from_provider(trainer)


def _legacy_on_two_ranks(rank, world_size, root):
    trainer = LegacyTrainer(0)  # same seed and data on both ranks: a replicated model and optimizer, as under DDP
    for _ in range(2):
        trainer.step()
    torch.manual_seed(100 + rank)  # per-rank RNG streams, as a DDP job seeds them
    with coordinator_from_provider(trainer, root, validate_replication=True) as coord:
        path = coord.save_checkpoint(checkpoint_id="checkpoint-2", validate=True)
    after_save = torch.randn(4)
    torch.manual_seed(7)  # scramble, then restore
    resumed = LegacyTrainer(1)
    with coordinator_from_provider(resumed, root) as coord:
        coord.load_checkpoint(path, components=load_keys(resumed))
    assert_same_training_state(trainer, resumed)
    stored = {k: (c.sharing_pattern, len(c.copies)) for k, c in read_manifest(path).components.items()}
    return after_save, torch.randn(4), stored


def test_legacy_provider_on_two_ranks_saves_rng_per_rank(ranks, tmp_path):
    (saved0, loaded0, stored), (saved1, loaded1, _) = ranks(_legacy_on_two_ranks, 2, str(tmp_path))
    assert torch.equal(saved0, loaded0) and torch.equal(saved1, loaded1)  # each rank got its own stream back
    assert not torch.equal(loaded0, loaded1)
    assert stored == {"model": ("replicated", 1), "optimizer": ("replicated", 1), "scheduler": ("replicated", 1),
                      "rng": ("per_rank", 2)}
