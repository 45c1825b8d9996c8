"""Prune on load through transformers, and the pruned checkpoint's round trip (save, reload, push, re-quantize).

Tiny Llamas saved with ``save_pretrained`` and token-id calibration keep these fast; one slow test runs the real model
with text calibration (tokenizer loaded from the model's path, as prune on load does by default).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaForCausalLM, \
    PreTrainedModel
from transformers.models.auto.auto_factory import _BaseAutoModelClass
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, AutoHfQuantizer, \
    get_hf_quantizer

import hf_sparse
from conftest import CALIBRATION_TXT, MODEL_DIR, load_pretrained, tiny_llama
from hf_sparse.integrations import transformers as integration
from hf_sparse.integrations.transformers import HfSparseQuantizer


def _ids(samples: int = 8, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (samples, length), generator=torch.Generator().manual_seed(seed))


def _cfg(**overrides) -> hf_sparse.SparsityConfig:
    values = dict(method="wanda", pattern="2:4", calibration=_ids(), num_samples=8, sequence_length=16, batch_size=4)
    values.update(overrides)
    return hf_sparse.SparsityConfig(**values)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _reference(path: Path, cfg: hf_sparse.SparsityConfig) -> PreTrainedModel:
    """The same checkpoint loaded plainly, then pruned in memory."""
    model = AutoModelForCausalLM.from_pretrained(path)
    hf_sparse.prune(model, cfg, show_progress=False)
    return model


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dense")
    tiny_llama(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pruned(dense_dir, tmp_path_factory):
    """A model pruned on load (wanda 2:4) and its saved checkpoint."""
    model = AutoModelForCausalLM.from_pretrained(dense_dir, sparsity_config=_cfg())
    path = tmp_path_factory.mktemp("pruned")
    model.save_pretrained(path)
    return SimpleNamespace(model=model, path=path)


@pytest.fixture
def no_hook():
    hf_sparse.uninstall_from_pretrained_hook()
    try:
        yield
    finally:
        hf_sparse.install_from_pretrained_hook()


# ---------------------------------------------------------------------------------------------------------------
# Prune on load: every entry point gives exactly what prune() gives on the loaded model


def _load_auto_sparsity_config(path, cfg):
    return AutoModelForCausalLM.from_pretrained(path, sparsity_config=cfg)


def _load_llama_sparsity_config(path, cfg):
    return LlamaForCausalLM.from_pretrained(path, sparsity_config=cfg)


def _load_auto_sparsity_dict(path, cfg):
    return AutoModelForCausalLM.from_pretrained(path, sparsity_config={**cfg.to_dict(), "calibration": cfg.calibration})


def _load_quantization_config(path, cfg):
    hf_sparse.uninstall_from_pretrained_hook()  # transformers' own registry, no hook involved
    try:
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg)
    finally:
        hf_sparse.install_from_pretrained_hook()


def _load_auto_sparse_class_without_hook(path, cfg):
    hf_sparse.uninstall_from_pretrained_hook()
    try:
        return hf_sparse.AutoSparseModelForCausalLM.from_pretrained(path, sparsity_config=cfg)
    finally:
        hf_sparse.install_from_pretrained_hook()


ENTRY_POINTS = [_load_auto_sparsity_config, _load_llama_sparsity_config, _load_auto_sparsity_dict,
                _load_quantization_config, _load_auto_sparse_class_without_hook]


@pytest.fixture(scope="module")
def references(dense_dir):
    """prune() on the plainly loaded checkpoint, once per (method, pattern)."""
    cache = {}

    def get(method, pattern):
        if (method, pattern) not in cache:
            cache[method, pattern] = _reference(dense_dir, _cfg(method=method, pattern=pattern))
        return cache[method, pattern]

    return get


@pytest.mark.parametrize("load", ENTRY_POINTS, ids=lambda f: f.__name__.removeprefix("_load_"))
@pytest.mark.parametrize("method,pattern", [("wanda", "2:4"), ("sparsegpt", "unstructured")])
def test_prune_on_load_is_bit_identical_to_prune(dense_dir, references, load, method, pattern):
    model = load(dense_dir, _cfg(method=method, pattern=pattern))
    reference = references(method, pattern)
    _assert_same_weights(model, reference)
    assert hf_sparse.read_record(model) == hf_sparse.read_record(reference)
    assert hf_sparse.read_record(model).overall_sparsity == 0.5
    assert type(model) is LlamaForCausalLM and not model.training


def test_prune_on_load_leaves_a_plain_model(dense_dir, pruned, tmp_path):
    model, plain = pruned.model, AutoModelForCausalLM.from_pretrained(dense_dir)
    for attribute in ("hf_quantizer", "is_quantized", "quantization_method"):
        assert getattr(model, attribute, None) is None, attribute
    assert not hasattr(model.config, "quantization_config") and not hasattr(model.config, "_is_quantized")
    # Nothing else either: the instance and config attributes are those of a model loaded without a quantizer.
    assert set(vars(model)) == set(vars(plain))
    assert set(vars(model.config)) == set(vars(plain.config)) | {"sparsity_config"}
    saved = json.loads((pruned.path / "config.json").read_text())
    assert "quantization_config" not in saved
    assert saved["sparsity_config"] == model.config.sparsity_config
    assert saved["sparsity_config"]["method"] == "wanda" and saved["sparsity_config"]["pattern"] == "2:4"


def test_trainer_runs_a_step_on_a_model_pruned_on_load(dense_dir, tmp_path):
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_utils import validate_quantization_for_training

    model = AutoModelForCausalLM.from_pretrained(dense_dir, sparsity_config=_cfg())
    validate_quantization_for_training(model)  # what Trainer checks: it would refuse a model that looks quantized
    rows = _ids(4, 16, seed=1).tolist()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, use_cpu=True,
                             report_to=[], save_strategy="no", learning_rate=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows])
    before = model.lm_head.weight.detach().clone()
    result = trainer.train()
    assert trainer.state.global_step == 1
    assert math.isfinite(result.training_loss) and result.training_loss > 0
    assert not torch.equal(before, model.lm_head.weight)


# ---------------------------------------------------------------------------------------------------------------
# Save / reload


def test_reload_with_hf_sparse_gives_identical_logits_and_masks(pruned):
    reloaded = AutoModelForCausalLM.from_pretrained(pruned.path)
    ids = _ids(2, 16, seed=7)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruned.model(ids).logits)
    masks, expected = hf_sparse.get_masks(reloaded), hf_sparse.get_masks(pruned.model)
    assert masks.keys() == expected.keys() and len(masks) == 14  # 2 blocks x 7 linears
    assert all(torch.equal(masks[name], expected[name]) for name in masks)
    assert hf_sparse.read_record(reloaded) == hf_sparse.read_record(pruned.model)


_PLAIN_TRANSFORMERS = textwrap.dedent("""
    import sys
    sys.modules["hf_sparse"] = None  # "import hf_sparse" now raises ImportError: this is plain transformers
    import torch
    from transformers import AutoModelForCausalLM

    path, ids_path, out_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(path)
    modules = dict(model.named_modules())
    record = model.config.sparsity_config
    with torch.no_grad():
        logits = model(torch.load(ids_path)).logits
    torch.save({
        "logits": logits,
        "masks": {name: modules[name].weight != 0 for name in record["modules"]},
        "record": record,
        "quantized": getattr(model, "hf_quantizer", None) is not None or hasattr(model.config, "quantization_config"),
        "hf_sparse_loaded": any(name.startswith("hf_sparse") and m is not None for name, m in sys.modules.items()),
    }, out_path)
""")


def test_reload_in_plain_transformers_without_hf_sparse(pruned, tmp_path):
    ids = _ids(2, 16, seed=7)
    torch.save(ids, tmp_path / "ids.pt")
    done = subprocess.run(
        [sys.executable, "-c", _PLAIN_TRANSFORMERS, str(pruned.path), str(tmp_path / "ids.pt"),
         str(tmp_path / "out.pt")],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "quantiz" not in done.stderr.lower()  # no "unknown quantization type" warning
    out = torch.load(tmp_path / "out.pt")
    assert not out["hf_sparse_loaded"] and not out["quantized"]
    with torch.no_grad():
        assert torch.equal(out["logits"], pruned.model(ids).logits)
    expected = hf_sparse.get_masks(pruned.model)
    assert out["masks"].keys() == expected.keys()
    assert all(torch.equal(out["masks"][name], expected[name]) for name in expected)
    assert out["record"] == pruned.model.config.sparsity_config


def test_reloading_a_pruned_checkpoint_with_a_new_sparsity_config_prunes_again(pruned):
    # The checkpoint has a top-level "sparsity_config" key; the keyword must still reach the quantizer.
    cfg = hf_sparse.SparsityConfig(method="magnitude", sparsity=0.7)
    model = AutoModelForCausalLM.from_pretrained(pruned.path, sparsity_config=cfg)
    record = hf_sparse.read_record(model)
    assert record.method == "magnitude" and record.target_sparsity == 0.7
    assert record.overall_sparsity == pytest.approx(0.7, abs=1e-4)  # exact counts: round(0.7 * numel) per matrix
    _assert_same_weights(model, _reference(pruned.path, cfg))
    # Every weight wanda removed is still zero: magnitude ranks those zeros first.
    before = hf_sparse.get_masks(pruned.model)
    after = hf_sparse.get_masks(model)
    assert all(not (after[name] & ~before[name]).any() for name in before)


def test_without_the_hook_transformers_swallows_or_rejects_the_keyword(dense_dir, pruned, no_hook):
    # Why the hook exists (transformers 5.x behaviour): the keyword flows through the config into the model...
    with pytest.raises(TypeError, match="sparsity_config"):
        LlamaForCausalLM.from_pretrained(dense_dir, sparsity_config=_cfg())
    # ...and a pruned checkpoint's own "sparsity_config" key silently absorbs it: nothing is pruned.
    model = AutoModelForCausalLM.from_pretrained(pruned.path, sparsity_config={"method": "magnitude", "sparsity": 0.7})
    assert model.config.sparsity_config == {"method": "magnitude", "sparsity": 0.7}
    _assert_same_weights(model, pruned.model)


# ---------------------------------------------------------------------------------------------------------------
# The hook and the registration


def _hooked_classes() -> dict[type, classmethod]:
    import transformers.models.auto.modeling_auto as modeling_auto

    classes = [PreTrainedModel, _BaseAutoModelClass] + [
        cls for cls in vars(modeling_auto).values()
        if isinstance(cls, type) and issubclass(cls, _BaseAutoModelClass) and "from_pretrained" in cls.__dict__
    ]
    return {cls: cls.__dict__["from_pretrained"] for cls in classes}


def test_hook_install_and_uninstall_are_idempotent_and_exact():
    wrapped = _hooked_classes()
    assert AutoModelForCausalLM in wrapped and len(wrapped) > 30  # every AutoModel* class has its own copy
    assert all(getattr(f.__func__, "_hf_sparse_hook", False) for f in wrapped.values())  # installed by the import
    hf_sparse.install_from_pretrained_hook()  # a second install does not wrap twice
    assert _hooked_classes() == wrapped
    try:
        hf_sparse.uninstall_from_pretrained_hook()
        hf_sparse.uninstall_from_pretrained_hook()
        for cls, restored in _hooked_classes().items():
            assert isinstance(restored, classmethod) and not hasattr(restored.__func__, "_hf_sparse_hook"), cls
            assert restored.__func__ is wrapped[cls].__func__.__wrapped__, cls  # exactly the function transformers made
        assert LlamaForCausalLM.from_pretrained.__func__ is PreTrainedModel.__dict__["from_pretrained"].__func__
        assert not integration.is_from_pretrained_hook_installed()
    finally:
        hf_sparse.install_from_pretrained_hook()
    assert integration.is_from_pretrained_hook_installed()
    assert _hooked_classes().keys() == wrapped.keys()


@pytest.mark.parametrize("other", [BitsAndBytesConfig(load_in_4bit=True), hf_sparse.SparsityConfig(method="magnitude")],
                         ids=["bitsandbytes", "another_sparsity_config"])
def test_sparsity_config_and_a_different_quantization_config_conflict(dense_dir, other):
    cfg = _cfg()
    for load in (AutoModelForCausalLM.from_pretrained, LlamaForCausalLM.from_pretrained,
                 hf_sparse.AutoSparseModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match="sparsity_config .method=.wanda.*different quantization_config"):
            load(dense_dir, sparsity_config=cfg, quantization_config=other)
    # The same object twice is not a conflict.
    model = AutoModelForCausalLM.from_pretrained(dense_dir, sparsity_config=cfg, quantization_config=cfg)
    assert hf_sparse.read_record(model).overall_sparsity == 0.5


def test_sparsity_config_of_a_wrong_type_is_a_clear_error(dense_dir):
    with pytest.raises(ValueError, match="SparsityConfig or a dict.*got str"):
        AutoModelForCausalLM.from_pretrained(dense_dir, sparsity_config="wanda")


def test_quantizer_is_registered_once_and_built_from_json():
    assert AUTO_QUANTIZER_MAPPING["hf_sparse"] is HfSparseQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["hf_sparse"] is hf_sparse.SparsityConfig
    integration._register()  # what a second import does: no "already registered" error
    assert AUTO_QUANTIZER_MAPPING["hf_sparse"] is HfSparseQuantizer
    quantizer = AutoHfQuantizer.from_config(_cfg(method="sparsegpt", pattern="4:8").to_dict(), pre_quantized=False)
    assert isinstance(quantizer, HfSparseQuantizer)
    assert quantizer.quantization_config.method == "sparsegpt" and quantizer.quantization_config.pattern == "4:8"
    assert HfSparseQuantizer.requires_calibration is False
    assert quantizer.is_trainable is True and quantizer.is_qat_trainable is False and quantizer.is_serializable()


def test_checkpoint_with_an_hf_sparse_quantization_config_is_not_pruned_twice(pruned, tmp_path):
    # hf_sparse never writes one, but another tool might: its weights are taken as already pruned.
    path = tmp_path / "ckpt"
    shutil.copytree(pruned.path, path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = hf_sparse.SparsityConfig(method="magnitude", sparsity=0.9).to_dict()
    (path / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(path)
    _assert_same_weights(model, pruned.model)
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")


# ---------------------------------------------------------------------------------------------------------------
# config.json is untrusted


@pytest.mark.parametrize("field,value,named", [
    ("method", "lottery", "'lottery'"),
    ("pattern", "3:2", "'3:2'"),
    ("pattern", "blocky", "'blocky'"),
    ("target_sparsity", 1.5, "1.5"),
    ("format_version", 99, "99"),
    ("format", "other_tool", "'other_tool'"),
    ("modules", {"model.layers.0.mlp.up_proj": 1.5}, "1.5"),
])
def test_tampered_record_is_rejected(pruned, tmp_path, field, value, named):
    path = tmp_path / "tampered"
    shutil.copytree(pruned.path, path)
    config = json.loads((path / "config.json").read_text())
    config["sparsity_config"][field] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{field}.*{named}|{named}.*{field}|{named}"):
        hf_sparse.read_record(AutoConfig.from_pretrained(path))
    model = AutoModelForCausalLM.from_pretrained(path)  # the model itself still loads: the record is only data
    with pytest.raises(ValueError) as error:
        hf_sparse.get_masks(model)
    assert str(value if not isinstance(value, dict) else 1.5) in str(error.value)


def test_record_naming_a_missing_module_is_rejected(pruned, tmp_path):
    path = tmp_path / "tampered"
    shutil.copytree(pruned.path, path)
    config = json.loads((path / "config.json").read_text())
    config["sparsity_config"]["modules"]["model.layers.9.mlp.up_proj"] = 0.5
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'model.layers.9.mlp.up_proj'"):
        hf_sparse.get_masks(AutoModelForCausalLM.from_pretrained(path))


# ---------------------------------------------------------------------------------------------------------------
# push_to_hub and other quantization configs


def test_push_to_hub_uploads_what_save_pretrained_writes(pruned, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        # The files live in a temporary folder that is deleted after the upload: read them now.
        for op in operations:
            uploaded[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
        return SimpleNamespace(repo_id=repo_id, oid="0" * 40)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    card = SimpleNamespace(save=lambda path: Path(path).write_text("card"))  # ModelCard.load calls the Hub
    monkeypatch.setattr(transformers.utils.hub, "create_and_tag_model_card", lambda repo_id, tags=None, token=None: card)
    pruned.model.push_to_hub("someone/pruned-tiny-llama")

    config = json.loads(uploaded["config.json"])
    assert config["sparsity_config"] == pruned.model.config.sparsity_config
    assert "quantization_config" not in config
    saved = {p.name: p.read_bytes() for p in pruned.path.iterdir()}
    assert set(uploaded) - {"README.md"} == set(saved)
    assert uploaded["model.safetensors"] == saved["model.safetensors"]  # the very bytes save_pretrained writes


def test_pruned_checkpoint_accepts_another_quantization_config(pruned, monkeypatch):
    # No CPU-only quantization backend is installed here, so this stops where transformers picks the quantizer; the
    # point is that a pruned checkpoint is not "pre-quantized", so e.g. 4-bit QLoRA loading is not refused.
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    monkeypatch.setattr(Bnb4BitHfQuantizer, "validate_environment", lambda self, *args, **kwargs: None)
    config = AutoConfig.from_pretrained(pruned.path)
    assert not hasattr(config, "quantization_config") and hf_sparse.read_record(config) is not None
    quantizer, config, _ = get_hf_quantizer(config, BitsAndBytesConfig(load_in_4bit=True), None, True, {})
    assert isinstance(quantizer, Bnb4BitHfQuantizer) and quantizer.pre_quantized is False
    assert hf_sparse.read_record(config).overall_sparsity == 0.5  # the record rides along

    # Had the record been kept under quantization_config, transformers would refuse the 4-bit config:
    config.quantization_config = hf_sparse.SparsityConfig(method="magnitude").to_dict()
    with pytest.raises(ValueError, match="quantized with SparsityConfig but you are passing a BitsAndBytesConfig"):
        get_hf_quantizer(config, BitsAndBytesConfig(load_in_4bit=True), None, True, {})


# ---------------------------------------------------------------------------------------------------------------
# The real model, text calibration, tokenizer from the model's path


@pytest.mark.slow
def test_real_model_prune_on_load_with_text_calibration(tmp_path):
    cfg = hf_sparse.SparsityConfig(method="wanda", pattern="2:4", calibration=str(CALIBRATION_TXT),
                                   num_samples=16, sequence_length=128)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, sparsity_config=cfg)
    reference = load_pretrained()
    hf_sparse.prune(reference, cfg, tokenizer=AutoTokenizer.from_pretrained(MODEL_DIR), show_progress=False)
    _assert_same_weights(model, reference)
    record = hf_sparse.read_record(model)
    assert record.overall_sparsity == 0.5 and len(record.modules) == 6 * 7
    # A local file by base name and content hash: config.json never holds a local path.
    assert record.calibration == {"kind": "file", "name": CALIBRATION_TXT.name,
                                  "sha256": hashlib.sha256(CALIBRATION_TXT.read_bytes()).hexdigest(),
                                  "num_samples": 16, "sequence_length": 128, "seed": 0}
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = _ids(1, 32, seed=3)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
