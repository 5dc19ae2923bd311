"""What ships inside the package for the named models: value heads (the `probe` reward) and
budget policies (`compute-optimal`). Each must belong to the model it is filed under (its
GGUF sha256), load, and say whether it is the default, without loading a model."""

from __future__ import annotations

import pytest

from itscale.lm.models import MODELS
from itscale.rewards.probe import SHIPPED as HEADS
from itscale.rewards.probe import ValueHead, card_layers, head_digest, read_card
from itscale.search.allocation import SHIPPED as POLICIES
from itscale.search.allocation import BudgetPolicy

heads = sorted(p for p in HEADS.iterdir() if p.is_dir()) if HEADS.exists() else []
policies = sorted(POLICIES.glob("*.json")) if POLICIES.exists() else []


def test_something_ships_for_the_default_model() -> None:
    assert "qwen2.5-coder-0.5b" in {p.name for p in heads}
    assert "qwen2.5-coder-0.5b" in {p.stem for p in policies}


@pytest.mark.parametrize("directory", heads, ids=lambda p: p.name)
def test_a_shipped_head_belongs_to_its_model_and_was_trained_on_training_data(directory) -> None:
    card = read_card(directory)
    assert directory.name in MODELS and card["generator"]["gguf_sha256"] == MODELS[directory.name].sha256
    head = ValueHead.load(directory / "head.npz")
    assert head.n_features == card["generator"]["n_embd"] * len(card_layers(card))
    assert isinstance(card["default"], bool)
    assert not card["data"]["source"].endswith("_test.jsonl")
    assert card["command"][:2] == ["itscale", "train-reward"]


@pytest.mark.parametrize("path", policies, ids=lambda p: p.stem)
def test_a_shipped_policy_belongs_to_its_model(path) -> None:
    policy = BudgetPolicy.load(path)
    assert path.stem in MODELS and policy.generator["gguf_sha256"] == MODELS[path.stem].sha256
    assert not policy.card["data"]["dataset"].endswith("_test.jsonl")
    assert [c.budget for c in policy.allocate(policy.first_batch)] == [policy.first_batch] * policy.levels
    if policy.reads_head:  # its difficulty or its weighted vote is read from the head shipped beside it
        assert policy.card["head_sha256"] == head_digest(HEADS / path.stem)
