"""2:4 kernels: dispatch decisions, the dense fallback, compressed-form numerics against the dense matmul, the state
dict; GPU tests run only with CUDA (and sm >= 8.0 with cuSPARSELt)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hf_sparse
from conftest import tiny_llama
from hf_sparse.formats.n_m import decode_n_m, encode_n_m
from hf_sparse.kernels import (
    H100_TABLE, DispatchTable, SemiStructuredSparseLinear, check_2of4_device, disable_2of4, enable_2of4, plan_2of4,
    table_for_device,
)
from hf_sparse.masks import select_n_m


def _linear_2of4(out_features=32, in_features=64, dtype=torch.float32, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(select_n_m(linear.weight.abs(), 2, 4))
    return linear.to(dtype)


# --- dispatch decisions -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192)])
def test_h100_table_is_sparse_only_from_4096_tokens_on_measured_shapes(shape):
    assert H100_TABLE.use_sparse(*shape, 4096) and H100_TABLE.use_sparse(*shape, 16384)
    for tokens in (1, 16, 256, 1023, 2048, 4095):  # decode, <= 256 (~1.0x), < 1024 (0.3-0.7x), 1024-4096 unmeasured
        assert not H100_TABLE.use_sparse(*shape, tokens)


def test_unmeasured_shapes_and_gpus_run_dense():
    assert not H100_TABLE.use_sparse(1024, 8192, 65536)  # 70B key/value projection: not singled out as measured
    assert not H100_TABLE.use_sparse(576, 576, 65536)
    assert table_for_device("NVIDIA H100 80GB HBM3") is H100_TABLE
    assert table_for_device("NVIDIA A100-SXM4-80GB") is None and table_for_device("Tesla T4") is None


def test_table_json_round_trip_and_validation(tmp_path):
    table = DispatchTable("A100", {(4096, 4096): 8192, (11008, 4096): 2048}, source="measured here")
    table.save(tmp_path / "t.json")
    assert DispatchTable.load(tmp_path / "t.json") == table
    with pytest.raises(ValueError, match="min_tokens 0"):
        DispatchTable("x", {(16, 16): 0})
    with pytest.raises(ValueError, match="triples"):
        DispatchTable.from_dict({"device": "x", "min_tokens": [[1, 2]]})


# --- the module on CPU: dense fallback and state dict ------------------------------------------------------------

@pytest.mark.parametrize("tokens_shape", [(1, 64), (3, 7, 64), (4096, 64)])
def test_module_without_sparse_copy_is_exactly_the_dense_linear(tokens_shape):
    linear = _linear_2of4()
    module = SemiStructuredSparseLinear(linear, DispatchTable("any", {(32, 64): 1}))
    x = torch.randn(*tokens_shape)
    assert torch.equal(module(x), linear(x)) and module.last_path == "dense"


def test_state_dict_is_that_of_nn_linear_and_round_trips():
    linear = _linear_2of4(seed=1)
    module = SemiStructuredSparseLinear(linear, H100_TABLE)
    state = module.state_dict()
    assert state.keys() == linear.state_dict().keys()
    other = SemiStructuredSparseLinear(_linear_2of4(seed=2), H100_TABLE)
    other.load_state_dict(state)
    assert all(torch.equal(other.state_dict()[k], state[k]) for k in state)
    back = module.to_linear()
    assert type(back) is nn.Linear and back.weight is module.weight and back.bias is module.bias


def test_compressed_form_computes_the_dense_matmul():
    """The kept values and their 2-bit positions (what a 2:4 kernel reads) give the dense product."""
    linear = _linear_2of4(64, 128, bias=False, seed=3)
    x = torch.randn(5, 128, dtype=torch.float64)
    values, positions = encode_n_m(linear.weight.detach(), 2, 4)
    assert torch.equal(decode_n_m(values, positions, 128, 2, 4), linear.weight.detach())
    # Sparse product from the compressed form only: gather the inputs at the kept positions, multiply, sum.
    from hf_sparse.formats.bits import unpack_rows

    codes = (unpack_rows(positions, 32 * 2 * 2).reshape(64, 32, 2, 2).long() * torch.tensor([2, 1])).sum(-1)
    columns = (codes + 4 * torch.arange(32).view(1, 32, 1)).reshape(64, 64)  # (out, kept) input indices
    sparse_product = (x[:, columns] * values.double()).sum(-1)
    assert torch.allclose(sparse_product, F.linear(x, linear.weight.double()), atol=1e-12)


def test_plan_selects_2of4_half_precision_linears_only():
    model = tiny_llama(seed=0)
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude", pattern="2:4"), show_progress=False)
    assert plan_2of4(model) == []  # float32: cuSPARSELt takes fp16/bf16
    model = model.half()
    names = plan_2of4(model)
    assert sorted(names) == sorted(model.config.sparsity_config["modules"]) and "lm_head" not in names


def test_enable_refuses_on_cpu_and_changes_nothing():
    model = tiny_llama(seed=0)
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude", pattern="2:4"), show_progress=False)
    model = model.half()
    with pytest.raises(ValueError, match="model is on cpu.*Nothing was changed"):
        enable_2of4(model)
    assert not any(isinstance(m, SemiStructuredSparseLinear) for m in model.modules())
    with pytest.raises(ValueError, match="on cpu"):
        check_2of4_device(torch.device("cpu"))


@pytest.mark.parametrize("capability,cusparselt,match", [
    ((7, 5), True, "compute capability 7.5; 2:4 sparse tensor cores need >= 8.0"),
    ((8, 0), False, "no cuSPARSELt"),
])
def test_device_check_refuses_old_gpus_and_builds_without_cusparselt(monkeypatch, capability, cusparselt, match):
    """The refusals for a CUDA device, checked on CPU by answering the device queries (no kernel runs)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: cusparselt)
    with pytest.raises(ValueError, match=f"{match}.*Nothing was changed"):
        check_2of4_device(torch.device("cuda"))


def test_disable_restores_plain_linears():
    model = nn.Sequential(nn.Linear(64, 32))
    model[0] = SemiStructuredSparseLinear(_linear_2of4(), H100_TABLE)
    assert disable_2of4(model) == ["0"] and type(model[0]) is nn.Linear


# --- GPU (skipped without CUDA) -----------------------------------------------------------------------------------

def _sparse_gpu_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    try:
        check_2of4_device(torch.device("cuda"))
    except ValueError as error:
        pytest.skip(str(error))


@pytest.mark.gpu
def test_gpu_sparse_path_matches_dense_and_decode_stays_dense():
    _sparse_gpu_or_skip()
    linear = _linear_2of4(256, 512, dtype=torch.float16).cuda()
    module = SemiStructuredSparseLinear(linear, DispatchTable("any", {(256, 512): 64}))
    module.compress()
    with torch.no_grad():
        prefill = torch.randn(128, 512, device="cuda", dtype=torch.float16)
        assert torch.allclose(module(prefill), linear(prefill), rtol=1e-2, atol=1e-2) and module.last_path == "sparse"
        decode = torch.randn(1, 512, device="cuda", dtype=torch.float16)
        assert torch.equal(module(decode), linear(decode)) and module.last_path == "dense"


@pytest.mark.gpu
def test_gpu_enable_2of4_on_a_pruned_model():
    _sparse_gpu_or_skip()
    model = tiny_llama(seed=0, hidden_size=128, intermediate_size=256)
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude", pattern="2:4"), show_progress=False)
    model = model.to("cuda", torch.float16)
    ids = torch.randint(0, 128, (2, 64), device="cuda")
    with torch.no_grad():
        expected = model(ids).logits
        names = enable_2of4(model, table=DispatchTable("any", {(128, 128): 1, (256, 128): 1, (128, 256): 1}))
        assert names and torch.allclose(model(ids).logits, expected, rtol=2e-2, atol=2e-2)
    assert disable_2of4(model) == names
