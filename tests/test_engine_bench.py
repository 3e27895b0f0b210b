"""`chatkv bench decode` on the tiny model: both contexts, the ablation, and the llama.cpp
peer named as missing in one line when it cannot run (never an error)."""

from __future__ import annotations

import json
import sys

import pytest

from chatkv.bench.peer import open_peer
from chatkv.cli import main


# transformers' own deprecation of the cache's keyword stays off the user's terminal
@pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")
def test_bench_decode_reports_both_contexts_and_says_why_there_is_no_peer(tiny_model_dir, capsys):
    args = ["bench", "decode", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32"]
    code = main([*args, "--tokens", "4", "--repeat", "1", "--long-context", "300", "--ablate", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["decode_step"] == "lean"
    assert "not a GGUF file" in out["peer"]
    short, long = out["contexts"]
    assert short["context_tokens"] < 100 and long["context_tokens"] == 300
    for row in (short, long):
        assert row["chatkv_tps"] > 0 and row["generate_tps"] > 0 and row["chatkv_forward_tps"] > 0
        assert row["vs_generate"] > 0 and "vs_llamacpp" not in row
    assert long["chatkv_forward_prefill_tps"] > 0 and "chatkv_forward_prefill_tps" not in short


def test_no_llama_cpp_installed_is_one_line_not_an_error(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF not really")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    peer, why = open_peer(str(gguf), 64, 1)
    assert peer is None and "llama-cpp-python is not installed" in why and "\n" not in why


def test_bench_batch_ablate_runs_the_forward_beside_the_lean_step(tiny_model_dir, capsys):
    """`chatkv bench batch --ablate`: a third run through transformers' forward gives the lean
    step's gain in the same run, over the same replies (float32: each row is its forward's)."""
    args = ["bench", "batch", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32"]
    code = main([*args, "--prompts", "3", "--system-tokens", "40", "--new-tokens", "3", "--ablate", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["forward_run"]["completion_tokens"] == out["second_run"]["completion_tokens"] > 0
    second, forward = out["second_run"]["tokens_per_s"], out["forward_run"]["tokens_per_s"]
    assert out["lean_speedup"] == round(second / forward, 2)
    assert out["forward_run_identical_to_second"] == "3/3"
