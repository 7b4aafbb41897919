"""The santa-tiny pipeline's data side: corpus filters, segments, the FIM training format
(which must be exactly what santa lays out at inference time) and the model card rewrite."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from santacli import fim
from santacli.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
pipeline = pytest.importorskip("training.pipeline")


def test_data_tables_are_recognised():
    codec = '""" Python Character Mapping Codec cp1252 generated from \'MAPPINGS/CP1252.TXT\' with gencodec.py.\n'
    assert pipeline.is_data_table("encodings/cp1252.py", codec + "decoding_table = (...)")
    assert not pipeline.is_data_table("encodings/utf_8.py", '""" Python \'utf-8\' Codec\n"""\nimport codecs\n')
    assert pipeline.is_data_table("pydoc_data/topics.py", "topics = {}")
    assert pipeline.is_data_table("html/entities.py", "name2codepoint = {}")
    assert not pipeline.is_data_table("json/encoder.py", codec)  # the mark counts only in encodings/


def test_segments_cut_at_line_boundaries_and_keep_every_character():
    text = "".join(f"line {i} " + "x" * (i % 7) + "\n" for i in range(200))
    segments = pipeline.split_segments(text, 300)
    assert "".join(segments) == text
    assert all(len(s) <= 300 and s.endswith("\n") for s in segments)
    assert pipeline.split_segments("short\n", 300) == ["short\n"]


def _split_example(example: list[int], fim_mode: str, tok: Tokenizer) -> tuple[str, str, list[int]]:
    """(prefix, suffix, middle ids) of one training example."""
    middle_at = example.index(pipeline.FIM_MIDDLE)
    if fim_mode == "psm":
        at_suffix = example.index(pipeline.FIM_SUFFIX)
        return (tok.decode(example[1:at_suffix]), tok.decode(example[at_suffix + 1:middle_at]),
                example[middle_at + 1:-1])
    # SPM v2: <fim-prefix><fim-suffix>S<fim-middle>PM, prefix and middle tokenized separately.
    body_ids = example[middle_at + 1:-1]
    body = tok.decode(body_ids)
    cut = next(i for i in range(len(body) + 1) if tok.encode(body[:i]) + tok.encode(body[i:]) == body_ids)
    return body[:cut], tok.decode(example[2:middle_at]), tok.encode(body[cut:])


@pytest.mark.parametrize(("spm_rate", "fim_mode"), [(0.0, "psm"), (1.0, "spm")])
def test_fim_training_examples_match_the_inference_layout(tokenizer, spm_rate, fim_mode):
    """A FIM training example is santa's prompt for the same prefix/suffix, then middle + EOS."""
    from tokenizers import Tokenizer as HFTokenizer

    docs = [(f"def add_{i}(a, b):\n    return a + b * {i}\n", True) for i in range(12)]
    stream = pipeline.encode_epoch(tokenizer, docs, epoch=0, fim_rate=1.0, spm_rate=spm_rate)
    tok = Tokenizer(HFTokenizer.from_str(tokenizer.to_str()))  # a copy: Tokenizer sets a flag on it
    examples = []
    while stream:
        end = stream.index(pipeline.EOS) + 1
        examples.append(stream[:end])
        stream = stream[end:]
    assert len(examples) == len(docs)
    checked = 0
    for example in examples:
        assert example[0] == pipeline.FIM_PREFIX and (fim_mode == "psm") == (example[1] != pipeline.FIM_SUFFIX)
        prefix, suffix, middle_ids = _split_example(example, fim_mode, tok)
        assert any(doc == prefix + tok.decode(middle_ids) + suffix for doc, _ in docs)
        if not suffix:
            continue  # split at the very end: santa lays that out left-to-right instead
        prompt = fim.build_prompt(tok.encode, prefix=prefix, suffix=suffix, fim=tok.fim,
                                  fim_mode=fim_mode, n_positions=4096, max_tokens=16)
        assert prompt.ids + middle_ids + [pipeline.EOS] == example
        checked += 1
    assert checked >= len(docs) // 2


def test_card_is_rewritten_with_the_evaluation_table(tmp_path):
    stats = {"corpus": {"python_version": "3.11.7", "n_files": 2, "train_chars": 10, "heldout_chars": 5,
                        "skipped_undecodable": [], "n_train_files": 1, "n_heldout_files": 1,
                        "excluded_data_tables": ["pydoc_data/topics.py"]},
             "hyper": {"vocab_size": 8192, "n_embd": 256, "n_layer": 4, "n_head": 4, "n_positions": 512,
                       "batch": 16, "lr": 0.002, "min_lr_ratio": 0.1, "warmup": 100, "weight_decay": 0.1,
                       "grad_clip": 1.0, "steps": 10},
             "n_params": 5, "segment_chars": 100, "epoch_tokens": 1000, "steps_done": 10, "tokens_trained": 100,
             "epochs": 1.0, "stopped_early": True, "train_seconds": 60, "total_seconds": 70,
             "hardware": "2-core CPU", "torch_version": "2.13.0", "train_loss": 2.0, "heldout_loss": 2.5,
             "heldout_tokens": 50, "command": "python -m training.pipeline"}
    (tmp_path / "training_stats.json").write_text(json.dumps(stats))
    (tmp_path / "heldout_files.json").write_text(json.dumps(["stat.py"]))
    result = {"fim_mode": "psm", "command": "python benchmarks/fim_eval.py --model tiny", "date": "2026-11-23",
              "heldout": {"lines": 300, "exact_match": 0.2, "baseline_repeat_previous_line": 0.01},
              "humaneval_single_line": {"tasks": 200, "exact_match": 0.05, "pass_rate": 0.1}}
    (tmp_path / "eval.json").write_text(json.dumps(result))
    pipeline.rewrite_card(tmp_path, tmp_path / "eval.json")
    card = (tmp_path / "README.md").read_text()
    assert "| held-out stdlib lines (single-line FIM) | 300 | 20.0% | - | 1.0% |" in card
    assert "| HumanEval single-line infilling | 200 | 5.0% | 10.0% | - |" in card
    assert "1 files\n  of data rather than code" in card
    assert "is **met**" in card
    saved = json.loads((tmp_path / "training_stats.json").read_text())
    assert saved["evaluation"] == result and "heldout_files" not in saved["corpus"]
