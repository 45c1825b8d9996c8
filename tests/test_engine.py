"""The shared layer-by-layer engine: statistics it hands to methods, devices and accelerate offload."""

from __future__ import annotations

import pytest
import torch

import hf_sparse
from conftest import tiny_llama
from hf_sparse.architectures import get_architecture
from hf_sparse.engine import PruningTarget, StatisticsCollector, capture_block_inputs


def _ids(samples=4, length=16, seed=0):
    return torch.randint(0, 128, (samples, length), generator=torch.Generator().manual_seed(seed))


def test_statistics_match_explicit_forward():
    model = tiny_llama()
    block = get_architecture(model).blocks(model)[0]
    ids = _ids()
    inputs = capture_block_inputs(model, block, ids, batch_size=2, device=torch.device("cpu"))
    assert len(inputs.hidden_states) == 2 and inputs.hidden_states[0].shape == (2, 16, 64)

    # The q_proj input, taken by hand: the normed hidden states the block's attention reads.
    seen = []
    handle = block.self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        model(ids)
    handle.remove()
    x = torch.cat(seen)  # (tokens, in)

    target = PruningTarget("q", block.self_attn.q_proj, 0.5)
    collector = StatisticsCollector([target], frozenset({"sq_norm", "hessian"}), torch.device("cpu"))
    collector.collect(block, inputs, None)
    stats = collector.stats["q"]
    assert stats.n_tokens == 64
    torch.testing.assert_close(stats.sq_norm, x.pow(2).sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.hessian, x.T @ x, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_accelerate_cpu_offload_prunes_the_offloaded_weights(method):
    from accelerate import cpu_offload

    cfg = hf_sparse.SparsityConfig(method=method, pattern="2:4", calibration=_ids(), num_samples=4,
                                   sequence_length=16, batch_size=2)
    reference = tiny_llama()
    hf_sparse.prune(reference, cfg, show_progress=False)

    offloaded = tiny_llama()
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert offloaded.model.layers[0].mlp.up_proj.weight.device.type == "meta"  # weights live in the offload store
    record = hf_sparse.prune(offloaded, cfg, show_progress=False)
    assert record.overall_sparsity == 0.5
    ids = _ids(1, 16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_explicit_device_and_batch_size_do_not_change_the_result():
    results = []
    for batch_size, device in [(1, None), (4, "cpu")]:
        model = tiny_llama()
        cfg = hf_sparse.SparsityConfig(method="sparsegpt", calibration=_ids(), num_samples=4, sequence_length=16,
                                       batch_size=batch_size, device=device)
        hf_sparse.prune(model, cfg, show_progress=False)
        results.append(model.model.layers[1].mlp.down_proj.weight.detach().clone())
    assert torch.equal(results[0] == 0, results[1] == 0)
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)


def test_include_exclude_select_modules():
    model = tiny_llama()
    cfg = hf_sparse.SparsityConfig(method="magnitude", include=[r"\.mlp\."], exclude=[r"down_proj"])
    record = hf_sparse.prune(model, cfg, show_progress=False)
    assert sorted(record.modules) == sorted(
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj"))
    assert model.model.layers[0].self_attn.q_proj.weight.ne(0).all()
    with pytest.raises(ValueError, match="no linear module matched"):
        hf_sparse.prune(tiny_llama(), hf_sparse.SparsityConfig(method="magnitude", include=["nothing_here"]))


@pytest.mark.gpu
def test_block_runs_on_gpu_while_model_stays_on_cpu():
    model = tiny_llama()
    cfg = hf_sparse.SparsityConfig(method="sparsegpt", calibration=_ids(), num_samples=4, sequence_length=16)
    hf_sparse.prune(model, cfg, show_progress=False)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.model.layers[0].mlp.up_proj.weight.eq(0).float().mean().item() == 0.5


def test_token_ids_are_cut_to_the_configured_shape_and_the_callers_rng_is_untouched():
    ids = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(0))
    model = tiny_llama()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    record = hf_sparse.prune(model, hf_sparse.SparsityConfig(method="wanda", calibration=ids, num_samples=4,
                                                             sequence_length=16), show_progress=False)
    assert torch.equal(torch.rand(3), expected_next)  # pruning seeded itself in a forked RNG state
    assert (record.calibration["num_samples"], record.calibration["sequence_length"]) == (4, 16)
    reference = tiny_llama()
    hf_sparse.prune(reference, hf_sparse.SparsityConfig(method="wanda", calibration=ids[:4, :16], num_samples=4,
                                                        sequence_length=16), show_progress=False)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
