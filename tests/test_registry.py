"""A new method is one class: the README's example registers, validates its options and prunes through the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import hf_sparse
from conftest import tiny_llama
from hf_sparse.masks import select_mask
from hf_sparse.methods import METHODS
from hf_sparse.methods.base import MethodOptions, PruningMethod, register_method


@dataclass
class PowerOptions(MethodOptions):
    power: float = field(default=1.0, metadata={"help": "exponent on the input norm"})


class PowerWanda(PruningMethod):
    name, options_class, statistics = "test_power_wanda", PowerOptions, frozenset({"sq_norm"})

    def prune_weight(self, weight, stats, pattern, sparsity):
        scores = weight.abs() * stats.sq_norm.sqrt().pow(self.options.power)
        return weight, select_mask(scores, pattern, sparsity, per_row=True)


@pytest.fixture
def registered():
    register_method(PowerWanda)
    yield
    METHODS.pop(PowerWanda.name)


def test_custom_method_equals_wanda_at_power_one(registered):
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    weights = []
    for method, options in [("wanda", {}), ("test_power_wanda", {"power": 1.0})]:
        model = tiny_llama()
        hf_sparse.prune(model, hf_sparse.SparsityConfig(method=method, method_options=options, calibration=ids,
                                                        num_samples=4, sequence_length=16), show_progress=False)
        weights.append(model.model.layers[1].self_attn.o_proj.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['alpha'\] for method 'test_power_wanda'; allowed: \['power'\]"):
        hf_sparse.SparsityConfig(method="test_power_wanda", method_options={"alpha": 2})


def test_registry_rejects_bad_classes():
    class NotAMethod:
        name = "x"

    with pytest.raises(TypeError):
        register_method(NotAMethod)

    class BadStats(PowerWanda):
        name, statistics = "test_bad_stats", frozenset({"gradients"})

    with pytest.raises(ValueError, match=r"unknown statistics \['gradients'\]"):
        register_method(BadStats)
    with pytest.raises(ValueError, match="already registered"):
        class Clash(PowerWanda):
            name = "wanda"
        register_method(Clash)


def test_method_metadata_reaches_the_card_and_the_methods_listing(capsys):
    """A new method declares its display name and paper on the class; the card and `hf-sparse methods` show them
    without any other file knowing about it."""
    from hf_sparse import cli
    from hf_sparse.integrations.hub import render_model_card
    from hf_sparse.methods import PaperReference

    class CitedWanda(PowerWanda):
        name, display_name = "test_cited_wanda", "Cited-Wanda"
        paper = PaperReference("A Test Paper", "Doe and Roe", 2031, "https://arxiv.org/abs/3101.00001")

    register_method(CitedWanda)
    try:
        model = tiny_llama()
        ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
        hf_sparse.prune(model, hf_sparse.SparsityConfig(method="test_cited_wanda", pattern="2:4", calibration=ids,
                                                        num_samples=4, sequence_length=16), show_progress=False)
        text = render_model_card(model).text
        assert "| Pruning method | Cited-Wanda (`test_cited_wanda`" in text
        assert "| Paper | [Doe and Roe (2031), A Test Paper](https://arxiv.org/abs/3101.00001) |" in text
        assert cli.main(["methods"]) == 0
        out = capsys.readouterr().out
        assert "\ntest_cited_wanda: " in out
        assert "  Cited-Wanda, from Doe and Roe (2031), A Test Paper <https://arxiv.org/abs/3101.00001>" in out
    finally:
        METHODS.pop(CitedWanda.name)


def test_metadata_defaults_and_checks():
    class Plain(PowerWanda):
        name = "test_plain"

    register_method(Plain)
    try:
        assert Plain.display_name == "test_plain" and Plain.paper is None and Plain.needs_calibration
    finally:
        METHODS.pop(Plain.name)

    class DataFreeWithStats(PowerWanda):
        name, needs_calibration = "test_data_free", False

    with pytest.raises(ValueError, match=r"needs_calibration = False but asks for statistics \['sq_norm'\]"):
        register_method(DataFreeWithStats)
    assert [cls.needs_calibration for cls in (METHODS["magnitude"], METHODS["wanda"])] == [False, True]
