"""lm-evaluation-harness (hope.hf.harness, evaluate.py --tasks) on the local tasks of tests/data/lm_eval, offline:
the harness's log-likelihoods and generations are the model's own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[eval]')")

from hope.config import preset  # noqa: E402
from hope.data.tokenizers import ByteTokenizer  # noqa: E402
from hope.hf import HopeForCausalLM, HopeHFConfig, hf_tokenizer  # noqa: E402
from hope.hf.harness import HopeHarnessLM, evaluate_tasks, task_manager  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = "tests/data/lm_eval"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cms = [{"period": 8, "hidden": 32}, {"period": None, "hidden": 32}]
    config = HopeHFConfig.from_hope(preset("hope", 1, vocab_size=256, cms=cms), pad_token_id=0)
    return HopeForCausalLM(config).eval()


def loglikelihood(model: HopeForCausalLM, context: str, continuation: str) -> tuple[float, bool]:
    """Σ log p(continuation | context) and whether greedy decoding gives the continuation, from the model alone."""
    ctx, cont = ByteTokenizer().encode(context), ByteTokenizer().encode(continuation)
    with torch.no_grad():
        logp = model.model(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1].log_softmax(-1)  # [n, V]
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def test_harness_scores_are_the_models_own(model, monkeypatch):
    monkeypatch.chdir(ROOT)  # the task YAMLs name their data file relative to the repository root
    lm = HopeHarnessLM(model, tokenizer=hf_tokenizer(ByteTokenizer()), batch_size=3)
    tasks = ["hope_tiny_choice", "hope_tiny_cloze", "hope_tiny_generate"]
    out = evaluate_tasks(lm, tasks, task_manager(tasks, TASKS), log_samples=True)
    n_checked = 0
    for task in ("hope_tiny_choice", "hope_tiny_cloze"):
        for sample in out["samples"][task]:
            for (context, continuation), ((ll, greedy),) in zip(sample["arguments"], sample["resps"]):
                ref_ll, ref_greedy = loglikelihood(model, context, continuation)
                assert ll == pytest.approx(ref_ll, rel=1e-4, abs=1e-4) and greedy == ref_greedy
                n_checked += 1
    assert n_checked == 11 + 5  # 11 choices of 5 questions, 5 cloze lines
    choice = out["samples"]["hope_tiny_choice"]
    acc = sum(max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0]) == s["target"] for s in choice) / 5
    assert out["results"]["hope_tiny_choice"]["acc,none"] == pytest.approx(acc)
    for sample in out["samples"]["hope_tiny_generate"]:  # left-padded batches of 3 prompts of different lengths
        context = sample["arguments"][0][0]
        ids = torch.tensor([ByteTokenizer().encode(context)])
        alone = model.model.generate(ids, 6, temperature=0)[0, ids.shape[1]:]
        expected = bytes(alone.tolist()).decode("utf-8", errors="replace").split("\n")[0]
        assert sample["resps"][0][0] == expected


def test_evaluate_py_runs_tasks(model, tmp_path, monkeypatch, capsys):
    import evaluate

    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    hf_tokenizer(ByteTokenizer()).save_pretrained(hf_dir)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", str(hf_dir), "--tasks", "hope_tiny_choice", "--include-path",
                                      TASKS, "--limit", "2", "--output", str(tmp_path / "results")])
    evaluate.main()
    printed = capsys.readouterr().out
    assert "hope_tiny_choice" in printed and "acc_norm" in printed
    saved = json.loads((tmp_path / "results" / "lm_eval.json").read_text())
    assert saved["meta"]["command"] and saved["meta"]["date"] and saved["seed"] == 0
    assert 0 <= saved["results"]["hope_tiny_choice"]["acc,none"] <= 1


@pytest.mark.parametrize(("args", "message"), [
    (["MODEL", "--tasks", "no_such_task", "--include-path", TASKS], "unknown lm-eval task(s) ['no_such_task']"),
    (["MODEL", "--tasks", " , "], "--tasks needs at least one task name, got ' , '"),
    (["MODEL", "--tasks", "hope_tiny_choice", "--limit", "0"], "--limit must be >= 1, got 0"),
    (["MODEL", "--tasks", "hope_tiny_choice", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["MODEL", "--tasks", "hope_tiny_choice", "--max-length", "0"], "--max-length must be >= 1, got 0"),
    (["./out/missing", "--tasks", "hope_tiny_choice", "--include-path", TASKS], "'./out/missing' does not exist"),
])
def test_evaluate_py_names_bad_input(model, tmp_path, monkeypatch, capsys, args, message):
    import evaluate

    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *[str(hf_dir) if a == "MODEL" else a for a in args]])
    with pytest.raises(SystemExit) as err:
        evaluate.main()
    assert message in str(err.value)


def test_lm_eval_command_line_knows_model_hope(model, tmp_path, monkeypatch, capsys):
    """What `python -m hope.hf.harness --model hope ...` runs: lm-eval's own CLI, after hope registered its model."""
    from lm_eval.__main__ import cli_evaluate

    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    hf_tokenizer(ByteTokenizer()).save_pretrained(hf_dir)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["lm-eval", "--model", "hope", "--model_args", f"pretrained={hf_dir}",
                                      "--device", "cpu", "--tasks", "hope_tiny_cloze", "--include_path", TASKS,
                                      "--limit", "2"])
    cli_evaluate()
    assert "hope_tiny_cloze" in capsys.readouterr().out
