"""Model cards and Hub uploads of pruned checkpoints: the card parses as a Hub card and states the real numbers; the
upload commit (captured, no network) carries README.md and config.json with the sparsity record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

import hf_sparse
from hf_sparse.integrations.hub import render_model_card, save_with_model_card, sparsity_by_module_type

from conftest import tiny_llama

EVALUATION = {"dense_perplexity": 53.06, "pruned_perplexity": 62.1, "recovered_perplexity": 57.37,
              "eval_data": "wikitext2-test.txt", "eval_sequence_length": 256}


@pytest.fixture
def pruned():
    """Tiny Llama, Wanda 2:4 on 4 × 16 calibration tokens, down_proj left dense."""
    model = tiny_llama()
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = hf_sparse.SparsityConfig(method="wanda", pattern="2:4", calibration=calibration, num_samples=4,
                                   sequence_length=16, exclude=[r"down_proj"])
    hf_sparse.prune(model, cfg, show_progress=False)
    return model


def test_sparsity_by_module_type_counts_the_weights(pruned):
    rows = {row["name"]: row for row in sparsity_by_module_type(pruned)}
    assert list(rows) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]  # model order, no down_proj
    assert rows["q_proj"] == {"name": "q_proj", "sparsity": 0.5, "weights": 2 * 64 * 64, "modules": 2}
    assert rows["k_proj"]["weights"] == 2 * 32 * 64  # 2 key/value heads of 16
    assert rows["gate_proj"]["weights"] == 2 * 128 * 64


def test_card_parses_as_a_hub_model_card_and_names_the_numbers(pruned):
    card = render_model_card(pruned, evaluation=EVALUATION, base_model="org/tiny-llama", license="apache-2.0",
                             repo_id="me/tiny-llama-2of4", tags=["demo"])
    parsed = ModelCard(str(card))  # YAML header + markdown, as the Hub reads README.md
    assert parsed.data.base_model == "org/tiny-llama"
    assert parsed.data.license == "apache-2.0"
    assert parsed.data.library_name == "transformers" and parsed.data.pipeline_tag == "text-generation"
    assert {"hf_sparse", "sparse", "pruned", "wanda", "2:4-sparsity", "demo"} <= set(parsed.data.tags)
    text = parsed.text
    for expected in ("| dense (org/tiny-llama) | 53.06 |", "| pruned (Wanda, 2:4) | 62.10 |",
                     "| recovered (fine-tuned, sparsity kept) | 57.37 |", "| `q_proj` | 50.00% | 8,192 |",
                     "| `gate_proj` | 50.00% | 16,384 |", "2:4 (N:M semi-structured)",
                     "4 token sequences (sha256", "4 sequences × 16 tokens (64 tokens), seed 0",
                     'from_pretrained("me/tiny-llama-2of4")', "on `wikitext2-test.txt`",
                     "50.00% of 57,344 weights in 12 modules",
                     "| Paper | [Sun, Liu, Bair and Kolter (2023), A Simple and Effective Pruning Approach for Large "
                     "Language Models](https://arxiv.org/abs/2306.11695) |"):
        assert expected in text, expected
    assert "down_proj" not in text.split("## Evaluation")[0]


def test_local_paths_stay_out_of_the_yaml_header(pruned, tmp_path):
    card = render_model_card(pruned, base_model=str(tmp_path / "my-base"))
    assert ModelCard(str(card)).data.base_model is None  # not a Hub id: the Hub would reject it
    assert "`my-base`" in card.text and str(tmp_path) not in card.text


def test_save_with_model_card_writes_record_and_card(pruned, tmp_path):
    path = save_with_model_card(pruned, None, tmp_path / "out", evaluation=EVALUATION, base_model="org/tiny-llama",
                                license="mit")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["sparsity_config"]["evaluation"]["pruned_perplexity"] == 62.1
    assert config["sparsity_config"]["base_model"] == "org/tiny-llama"
    card = ModelCard.load(path)
    assert card.data.license == "mit" and "| pruned (Wanda, 2:4) | 62.10 |" in card.text
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert hf_sparse.read_record(reloaded).evaluation["recovered_perplexity"] == 57.37
    assert all(not mask.all() for mask in hf_sparse.get_masks(reloaded).values())


class CapturedHub:
    """Stands in for the Hub: records create_repo and the files of every create_commit (read at commit time)."""

    def __init__(self, monkeypatch):
        self.repos: list[str] = []
        self.commits: list[dict[str, bytes]] = []
        hub = self

        def create_repo(self, repo_id, **kwargs):
            hub.repos.append(repo_id)
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def create_commit(self, repo_id, operations, **kwargs):
            files = {}
            for op in operations:
                source = op.path_or_fileobj
                files[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
            hub.commits.append(files)
            return None

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)


def test_push_to_hub_sends_card_config_and_weights_in_one_commit(pruned, monkeypatch):
    hub = CapturedHub(monkeypatch)
    hf_sparse.hub.push_to_hub(pruned, "me/tiny-llama-2of4", evaluation=EVALUATION, base_model="org/tiny-llama",
                              license="apache-2.0")
    assert hub.repos == ["me/tiny-llama-2of4"] and len(hub.commits) == 1
    files = hub.commits[0]
    assert {"README.md", "config.json", "model.safetensors"} <= set(files)
    record = json.loads(files["config.json"])["sparsity_config"]
    assert record["pattern"] == "2:4" and record["method"] == "wanda" and len(record["modules"]) == 12
    assert record["evaluation"]["dense_perplexity"] == 53.06
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "org/tiny-llama" and "| dense (org/tiny-llama) | 53.06 |" in card.text


def test_transformers_push_to_hub_keeps_the_record_and_an_existing_card(pruned, monkeypatch):
    """After hf_sparse.hub.push_to_hub, a plain ``model.push_to_hub`` keeps the card already on the Hub and sends
    config.json with the record."""
    hub = CapturedHub(monkeypatch)
    existing = render_model_card(pruned, evaluation=EVALUATION, base_model="org/tiny-llama", license="apache-2.0")
    monkeypatch.setattr(ModelCard, "load", classmethod(lambda cls, repo_id, **kwargs: ModelCard(str(existing))))
    pruned.push_to_hub("me/tiny-llama-2of4")
    files = hub.commits[-1]
    assert json.loads(files["config.json"])["sparsity_config"]["overall_sparsity"] == 0.5
    assert "| pruned (Wanda, 2:4) | 62.10 |" in ModelCard(files["README.md"].decode()).text


def test_push_needs_a_repo_id(pruned, tmp_path):
    with pytest.raises(ValueError, match="repo_id"):
        save_with_model_card(pruned, None, tmp_path, push_to_hub=True)
    with pytest.raises(ValueError, match="no 'sparsity_config' record"):
        render_model_card(tiny_llama())


def test_untrusted_record_strings_reach_the_card_as_text_not_html(pruned, tmp_path):
    """The record may come from someone's config.json: its strings are escaped, never HTML or markup in README.md."""
    from hf_sparse.record import read_record, write_record

    record = read_record(pruned)
    record.calibration = {"kind": "name_or_path", "name": "<script>alert(1)</script>.txt", "num_samples": 4,
                          "sequence_length": 16, "seed": 0}
    record.base_model = "<img src=x onerror=alert(2)>"
    record.recovery = {"method": "lora", "mode": "<b>masked</b>", "data": "a|b`c`.txt", "steps": 3}
    write_record(pruned, record)
    card = save_with_model_card(pruned, None, tmp_path / "out",
                                evaluation={"pruned_perplexity": 9.5, "eval_data": "```\n<iframe>"})
    text = card.read_text(encoding="utf-8")
    for raw in ("<script", "<img", "<b>", "<iframe"):
        assert raw not in text, raw
    prose = text.split("## Sparsity record")[0]
    assert "a|b" not in prose and "`c`" not in prose  # a table cell is not split, no code span is opened
    # The calibration name is shown by its last path component ("script>.txt", after the "/"), escaped.
    assert "| Calibration data | script&gt;.txt, 4 sequences" in text and "on a\\|b\\`c\\`.txt" in text
    assert text.count("```") == 6  # the three code blocks of the template, nothing opened or closed by the record
    record_block = text.split("```json\n")[1].split("\n```")[0]
    assert json.loads(record_block)["calibration"]["name"] == "<script>alert(1)</script>.txt"  # same JSON value
