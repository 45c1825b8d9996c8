"""A new method is one class: the README's example registers, validates its options and prunes through the engine;
a method needing a statistic the engine does not collect registers that statistic in its own file."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import hf_sparse
from conftest import tiny_llama
from hf_sparse.engine.statistics import STATISTICS, LinearStatistics, register_statistic
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


# A method with a statistic the engine does not know: both registered here, in the test file, nothing else touched.

class MeanAbsInputPruning(PruningMethod):
    """Scores |W_ij| · mean_t |x_tj| (a per-input mean absolute activation) and keeps the best per output row."""

    name, statistics = "test_mean_abs_input", frozenset({"test_mean_abs_input"})
    received: dict[int, LinearStatistics] = {}  # every call's statistics, by call order (the method sees no names)

    def prune_weight(self, weight, stats, pattern, sparsity):
        MeanAbsInputPruning.received[len(MeanAbsInputPruning.received)] = stats
        scores = weight.abs() * stats["test_mean_abs_input"].unsqueeze(0)
        return weight, select_mask(scores, pattern, sparsity, per_row=True)


@pytest.fixture
def mean_abs_method():
    @register_statistic("test_mean_abs_input", allocate=lambda n_in, device: torch.zeros(n_in, device=device),
                        finalize=lambda total, n_tokens: total / n_tokens)
    def accumulate(total, x):  # x: (tokens, in)
        total += x.abs().sum(0)

    register_method(MeanAbsInputPruning)
    MeanAbsInputPruning.received.clear()
    yield
    METHODS.pop(MeanAbsInputPruning.name)
    STATISTICS.pop("test_mean_abs_input")


def test_a_method_with_its_own_statistic_prunes_through_from_pretrained(mean_abs_method, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    config = hf_sparse.SparsityConfig(method="test_mean_abs_input", pattern="2:4", calibration=ids, num_samples=4,
                                      sequence_length=16, batch_size=2)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path, sparsity_config=config)
    assert pruned.config.sparsity_config["overall_sparsity"] == 0.5

    # By hand: block 0 reads the dense model's activations, so its up_proj input is the dense one.
    dense = tiny_llama()
    layer = dense.model.layers[0].mlp.up_proj
    seen = []
    handle = layer.register_forward_hook(lambda module, args, output: seen.append(args[0].reshape(-1, 64)))
    with torch.no_grad():
        dense(ids)
    handle.remove()
    mean_abs = torch.cat(seen).abs().mean(0)  # (in,)
    # The engine prunes q, k, v, o, gate, up, down; up_proj is the sixth operator of block 0.
    received = MeanAbsInputPruning.received[5]
    assert received.n_tokens == 64
    torch.testing.assert_close(received["test_mean_abs_input"], mean_abs, rtol=1e-5, atol=1e-6)
    expected = layer.weight * select_mask(layer.weight.abs() * mean_abs, hf_sparse.SparsityPattern.parse("2:4"),
                                          0.5, per_row=True)
    assert torch.equal(pruned.model.layers[0].mlp.up_proj.weight, expected)


def test_statistics_registry_rejects_clashes_and_bad_names():
    with pytest.raises(ValueError, match="already registered"):
        register_statistic("hessian", allocate=lambda n_in, device: torch.zeros(n_in))(lambda total, x: None)
    with pytest.raises(ValueError, match="must be an identifier"):
        register_statistic("not a name", allocate=lambda n_in, device: torch.zeros(n_in))(lambda total, x: None)
    with pytest.raises(ValueError, match="must name a registered statistic"):
        register_statistic("test_alias", allocate=lambda n_in, device: torch.zeros(n_in),
                           equals_when_unpruned="nothing")(lambda total, x: None)
    assert "test_alias" not in STATISTICS
