"""Calibration that fits the target: mixes of sources with shares, and the domain check against target data."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch

import hf_sparse
from conftest import DEMO_CALIBRATION, DEMO_MODEL, tiny_llama
from hf_sparse.calibration.domain import check_domain, token_overlap
from hf_sparse.calibration.mixes import load_mix, mix_counts
from hf_sparse.record import SparsityRecord


def _ids(seed: int, rows: int = 8, cols: int = 16, high: int = 128) -> torch.Tensor:
    return torch.randint(0, high, (rows, cols), generator=torch.Generator().manual_seed(seed))


def test_mix_counts_add_up_and_follow_the_weights():
    assert mix_counts([1, 1], 32) == [16, 16]
    assert mix_counts([3, 1], 8) == [6, 2]
    assert mix_counts([1, 1, 1], 10) == [3, 4, 3]
    assert sum(mix_counts([0.2, 0.5, 0.3], 7)) == 7


def test_mixed_token_sources_give_their_shares_in_order():
    a, b = _ids(0), _ids(1)
    ids = load_mix([a, b], [3, 1], None, num_samples=8, sequence_length=16, seed=0)
    assert torch.equal(ids[:6], a[:6]) and torch.equal(ids[6:], b[:2])


def test_mix_of_a_file_and_strings_with_a_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    texts = ["Once upon a time there was a king who had three daughters. " * 20]
    ids = load_mix([str(DEMO_CALIBRATION), texts], [1, 1], tokenizer, num_samples=6, sequence_length=16, seed=0)
    assert ids.shape == (6, 16)
    story = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    # the last three windows are slices of the story's token stream
    for row in ids[3:]:
        start = story.index(row[0].item())
        assert any(story[s:s + 16] == row.tolist() for s in range(start, len(story) - 15))


def test_mix_is_recorded_with_every_source_and_share():
    model = tiny_llama()
    cfg = hf_sparse.SparsityConfig(method="wanda", sparsity=0.5, calibration=[_ids(0), _ids(1)],
                                   calibration_weights=[1, 3], num_samples=8, sequence_length=16)
    record = hf_sparse.prune(model, cfg, show_progress=False)
    calibration = record.calibration
    assert calibration["kind"] == "mix" and calibration["num_samples"] == 8
    assert [s["share"] for s in calibration["sources"]] == [0.25, 0.75]
    assert all(s["kind"] == "token_ids" and len(s["sha256"]) == 64 for s in calibration["sources"])
    assert SparsityRecord.from_dict(record.to_dict()).calibration == calibration


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(calibration=[[[1, 2]], [[3, 4]]], calibration_weights=[1]), "one weight per calibration source"),
    (dict(calibration=[[[1, 2]], [[3, 4]]], calibration_weights=[1, 0]), r"calibration_weights\[1\] must be a positive"),
    (dict(calibration="wikitext", calibration_weights=[1]), "needs calibration to be a list of sources"),
])
def test_bad_mixes_are_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        hf_sparse.SparsityConfig(method="wanda", **kwargs)


def test_token_overlap_is_histogram_intersection():
    assert token_overlap(torch.tensor([[1, 1, 2, 3]]), torch.tensor([[1, 2, 2, 2]])) == 0.5
    assert token_overlap(torch.tensor([[5, 6]]), torch.tensor([[6, 5]])) == 1.0
    assert token_overlap(torch.tensor([[1, 1]]), torch.tensor([[2, 2]])) == 0.0


class _ListTokenizer:
    """Tokenizes text as the ids of its characters (mod vocab): enough for the domain check on a tiny model."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False, verbose=False):
        return {"input_ids": torch.tensor([[ord(c) % 128 for c in text]])}


def test_domain_check_warns_with_numbers_on_a_different_domain(caplog):
    model = tiny_llama()
    calibration = torch.arange(64).reshape(4, 16) % 20  # only ids 0..19
    other = ["".join(chr(100 + i % 20) for i in range(200))]  # only ids 100..119: no token in common
    with caplog.at_level(logging.WARNING, logger="hf_sparse.calibration.domain"):
        report = check_domain(model, calibration, other, _ListTokenizer())
    assert report.mismatch and report.token_overlap == 0.0 and report.target_windows == 12
    assert "token overlap 0.000" in caplog.text and "may do worse than magnitude" in caplog.text
    same = ["".join(chr(i % 20) for i in range(200))]
    report = check_domain(model, calibration, same, _ListTokenizer())
    assert report.token_overlap > 0.9 and abs(report.loss_gap) < 0.5 and not report.mismatch


def test_domain_check_goes_into_the_record_and_needs_calibration():
    model = tiny_llama()
    cfg = hf_sparse.SparsityConfig(method="wanda", sparsity=0.5, calibration=_ids(0), num_samples=8,
                                   sequence_length=16, target_data=["abc" * 50], tokenizer=_ListTokenizer())
    record = hf_sparse.prune(model, cfg, show_progress=False)
    check = record.domain_check
    assert set(check) >= {"calibration_loss", "target_loss", "loss_gap", "token_overlap", "mismatch"}
    assert check["target"]["kind"] == "texts" and "target_data" not in cfg.to_dict()
    assert SparsityRecord.from_dict(record.to_dict()).domain_check == check
    with pytest.raises(ValueError, match="target_data is compared with the calibration data"):
        hf_sparse.prune(tiny_llama(), hf_sparse.SparsityConfig(method="magnitude", target_data=["abc"]),
                        show_progress=False)


def test_cli_calibration_mix_and_target_data_flags(tmp_path):
    from hf_sparse.cli.prune import add_arguments, sparsity_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("alpha " * 100), b.write_text("beta " * 100)
    args = parser.parse_args(["m", "--calibration", str(a), "--calibration", str(b), "--calibration-weight", "3",
                              "--calibration-weight", "1", "--target-data", str(b), "--output", "o"])
    cfg = sparsity_config(args)
    assert cfg.calibration == [str(a), str(b)] and cfg.calibration_weights == [3.0, 1.0]
    assert cfg.target_data == str(b)
    assert [s["share"] for s in cfg.to_dict()["calibration"]["sources"]] == [0.75, 0.25]
    args = parser.parse_args(["m", "--calibration", str(a), "--calibration", str(b), "--output", "o"])
    assert sparsity_config(args).calibration_weights == [1.0, 1.0]  # several sources: equal shares
    args = parser.parse_args(["m", "--calibration", str(a), "--output", "o"])
    assert sparsity_config(args).calibration == str(a)  # one source: as before
    args = parser.parse_args(["m", "--calibration", str(a), "--calibration-weight", "1", "--calibration-weight",
                              "2", "--output", "o"])
    with pytest.raises(ValueError, match="one weight per source"):
        sparsity_config(args)


def test_split_book_keeps_the_text_between_the_markers_and_cuts_at_a_paragraph(tmp_path):
    # The README's second domain is made by examples/split_book.py: the same file must always give the same halves.
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from split_book import main as split_book

    book = tmp_path / "pg1.txt"
    body = "\r\n\r\n".join(f"Tale {i}. Once upon a time." for i in range(10))
    book.write_bytes(("\ufeffLicence text\r\n*** START OF THE BOOK ***\r\n\r\n" + body
                      + "\r\n*** END OF THE BOOK ***\r\nMore licence\r\n").encode("utf-8"))
    first, second = split_book([str(book), "--output-dir", str(tmp_path / "out")])
    # 268 characters: the middle (134) falls inside the blank line after tale 4, so the cut is the next one.
    assert first.read_text() == "\n\n".join(f"Tale {i}. Once upon a time." for i in range(6)) + "\n"
    assert second.read_text() == "\n\n".join(f"Tale {i}. Once upon a time." for i in range(6, 10)) + "\n"
    book.write_text("no markers here")
    with pytest.raises(ValueError, match=r"expected one '\*\*\* START OF' line"):
        split_book([str(book), "--output-dir", str(tmp_path / "out")])
