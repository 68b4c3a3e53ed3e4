"""Every shell command in README.md, docs/*.md and experiments/*/README.md runs as written, at its smallest size.

The commands are read from the documents themselves (fenced bash blocks, and inline code that starts with
`python` or `bash`), so a newly documented command is covered, or this test fails until it is classified:

- every command's arguments go through the script's own parser (Hydra's `--cfg job`, which composes the config
  with every override; argparse for the others; `bash -n` for shell scripts) and must be accepted;
- every command not listed below runs to the end in its tiny form: the documented arguments plus overrides that
  shrink it (`TRAIN_TINY` for train.py, two trials for the Optuna sweep, 8 tokens for generate.py), through the
  script's `__main__` in this process (the ~15 runs share one set of imports), with a temporary working folder;
- `PARSE_ONLY`: needs a GPU, a C++ compiler, the network, or has no tiny mode (each with its reason);
- `TINY_RUN_ELSEWHERE`: benchmarks whose `--tiny` mode their own test file runs; the test checks that the call
  is still there;
- synopses with placeholders (`eval|norms|cost`, `[--tiny]`, `…`, `<file>`) are not commands.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("experiments/*/README.md"))]
COMMAND = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:\.venv/bin/)?(?:python|bash)\s")
SYNOPSIS = re.compile(r"[\[\]|<>…]|\.\.\.")

# train.py at its smallest: a tiny model, two steps, one validation and one test batch, a checkpoint at step 2 (so
# that the documented resume, generate and evaluate commands find one), the shared token cache.
TRAIN_TINY = ["model.size=tiny", "trainer.max_steps=2", "trainer.val_check_interval=2", "data.seq_len=32",
              "data.batch_size=2", "data.max_val_tokens=256", "trainer.limit_val_batches=1",
              "+trainer.limit_test_batches=1", "callbacks.model_checkpoint.every_n_train_steps=2",
              f"paths.data_cache={ROOT / '.cache' / 'data'}"]
MAIN_JOB = "python train.py experiment=hope_small"
# Flags of the benchmarks set to their smallest values (the tiny budget leaves the others as documented).
REPLOT = ("harness", "plot_lm")  # commands that redraw a committed result file: no budget, no --out
SHRINK = {"--mode": "tiny", "--steps": "2", "--rounds": "2", "--tokens": "8", "--sweep": "0.5,2"}

# Benchmarks whose tiny mode is run by their own test file (with fewer models or local data, as each file says): here
# their documented commands are parsed, and the call below must still be in that file.
TINY_RUN_ELSEWHERE = {
    "experiments.continual.class_incremental": ("test_eval_class_incremental.py", 'ci.run(["--tiny"'),
    "experiments.continual.domain_incremental": ("test_eval_domain_incremental.py", 'di.run(["--tiny"'),
    "experiments.continual.test_time": ("test_eval_test_time.py", 'tt.run(["--tiny"'),
    "experiments.continual.long_stream": ("test_long_stream.py", 'long_stream.main([command, "--tiny"'),
    "experiments.lm_compare.compare": ("test_lm_compare.py", 'compare.run(["--tiny"'),
    "experiments.lm_compare.throughput": ("test_lm_compare.py", 'throughput.run(["--tiny"'),
    "experiments.lm_compare.decode": ("test_lm_compare.py", 'decode.run(["--tiny"'),
    "experiments.memory_tasks.mqar": ("test_eval_memory_tasks.py", 'mqar.run(["--tiny"'),
    "experiments.memory_tasks.passkey": ("test_eval_memory_tasks.py", '(passkey, "'),
    "experiments.memory_tasks.formal_languages": ("test_eval_memory_tasks.py", 'formal_languages.run(["--tiny"'),
    "experiments.memory_tasks": ("test_eval_memory_tasks.py", "mqar, passkey and formal_languages, as above"),
    "experiments.optimizers.lm_compare_optimizers": ("test_optimizers_lm.py", 'lmo.main(["--tiny"'),
    "experiments.reliability.kill_resume": ("test_faults.py", 'kill_resume.run(["--tiny"'),
    "hope.convert": ("test_convert.py", 'main([str(tmp_path / "src.ckpt"), str(tmp_path / "ha.ckpt"), "--periods"'),
}

# Commands that are neither run nor parsed here, and why.
NOT_RUN = {".venv/bin/python -m pytest -q -m \"not gpu\"": "the test suite itself, this test among its tests"}

# Commands that are only parsed, and why. Keys are the documented command, spaces normalised.
PARSE_ONLY = {
    # needs hardware this suite does not have
    "python train.py experiment=hope_small trainer=gpu": "one GPU",
    "python train.py experiment=hope_base": "sized for one GPU (trainer=gpu, bf16)",
    "python train.py trainer=ddp trainer.devices=4": "four devices (tests/test_training.py runs DDP on 2 CPUs)",
    "python train.py experiment=hope_small logger=many model.compile=true":
        "torch.compile needs a C++ compiler and minutes of compilation",
    "python -m hope.memory.bench core --threads 2 --compile": "torch.compile (C++ compiler, minutes)",
    # lm-eval tasks whose datasets come from the Hugging Face Hub (tests/test_lm_eval.py runs local tasks)
    "python evaluate.py out/hope_small_hf --tasks piqa,hellaswag --device cuda --batch-size 16 --output results/":
        "one GPU; piqa and hellaswag from the Hub",
    "python evaluate.py logs/hope_small/checkpoints/last.ckpt --tasks piqa": "piqa from the Hub",
    "python -m hope.hf.harness --model hope --model_args pretrained=out/hope_small_hf --tasks piqa --device cuda":
        "one GPU; piqa from the Hub",
    "python evaluate.py out/hope_hf --device cuda --batch-size 16 --num-fewshot 0 --output results/ --tasks "
    "wikitext,lambada_openai,piqa,hellaswag,winogrande,arc_easy,arc_challenge,social_iqa,boolq":
        "one GPU; the paper's zero-shot tasks from the Hub",
    # corpora streamed from the Hub (tests/test_streaming.py runs data=hf_stream and the tokenizer on local files)
    "python -m hope.data.train_tokenizer --name HuggingFaceFW/fineweb-edu --config sample-10BT --vocab-size 32768 "
    "--docs 200000 --out tokenizers/fineweb-edu-32k.json": "FineWeb-Edu from the Hub",
    "python train.py experiment=hope_base data=fineweb_edu data.tokenizer=bpe:tokenizers/fineweb-edu-32k.json":
        "FineWeb-Edu from the Hub, and a tokenizer trained on it",
    "python train.py data=fineweb_edu data.tokenizer=hf:gpt2": "FineWeb-Edu and the gpt2 tokenizer from the Hub",
    "python train.py experiment=hope_base data=fineweb_edu data.tokenizer=bpe:tokenizers/fineweb-edu-32k.json "
    "trainer=fsdp trainer.devices=8": "eight GPUs, FineWeb-Edu from the Hub (tests/test_fsdp.py runs two CPU ranks)",
    # installs packages from the network, or is this test suite itself
    "bash scripts/setup.sh": "network (pip); checked with `bash -n`",
    "HOPE_TORCH=torch bash scripts/setup.sh": "network (pip, a CUDA build); checked with `bash -n`",
    # no size flag: the whole test split of the default corpus
    "python evaluate.py logs/hope_small/checkpoints/last.ckpt --split test":
        "evaluates the whole test split; tests/test_training.py runs evaluate.py on a file",
    "python experiments/optimizers/toy_landscape.py": "no tiny mode (~80 s)",
}


def documented_commands() -> list[tuple[str, str]]:
    """(document, command) for every command in the documents, in order, `&&` chains split and comments cut."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
            if lang in ("", "bash", "sh", "shell"):
                for line in re.sub(r"\\\n\s*", " ", body).splitlines():
                    line = re.split(r"\s+#\s", line.strip(), maxsplit=1)[0]
                    found += [(doc.name, c) for c in line.split("&&")]
        prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        found += [(doc.name, c) for span in re.findall(r"`([^`]+)`", prose) for c in span.split("&&")]
    seen, out = set(), []
    for doc, c in found:
        c = " ".join(c.split())
        if COMMAND.match(c) and c not in seen:
            seen.add(c)
            out.append((doc, c))
    return out


class Parsed(Exception):
    """Raised right after a command line was parsed, to stop a parse-only command there."""


@contextlib.contextmanager
def command_line(argv: list[str], cwd: Path, parse_only: bool = False):
    """Run a script's `__main__` as `argv` in `cwd`, restoring argv, cwd, torch's thread count and logging."""
    old = sys.argv, Path.cwd(), torch.get_num_threads(), sys.path[:]
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **k):
        original(self, *a, **k)
        raise Parsed

    sys.argv = argv
    os.chdir(cwd)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if parse_only:
        argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = old[0]
        os.chdir(old[1])
        torch.set_num_threads(old[2])
        sys.path[:] = old[3]


def execute(command: str, cwd: Path, parse_only: bool = False) -> None:
    """Run `command` (a `python …` or `bash …` line) in this process; fail the test if it exits non-zero."""
    words = shlex.split(command)
    while "=" in words[0]:  # environment assignments (HOPE_TORCH=…)
        words.pop(0)
    if words[0] == "bash":
        proc = subprocess.run(["bash", "-n", str(ROOT / words[1])], capture_output=True, text=True)
        assert proc.returncode == 0, f"{command}: {proc.stderr}"
        return
    args = words[1:]
    train = args[0].endswith("train.py")
    if parse_only and train:
        args += ["--cfg", "job"]  # Hydra composes the config with every override, and stops
    with command_line(args, cwd, parse_only and not train):
        try:
            # by file, not runpy.run_module: pytest's import hook claims modules named test_*, such as
            # experiments.continual.test_time, and cannot hand their code to runpy
            path = module_file(args[1]) if args[0] == "-m" else ROOT / args[0]
            sys.argv = [str(path), *args[2 if args[0] == "-m" else 1:]]
            runpy.run_path(str(path), run_name="__main__")
        except Parsed:
            return
        except SystemExit as e:
            assert e.code in (None, 0), f"{command!r} exited with {e.code!r}"


def module_file(name: str) -> Path:
    """The file `python -m name` runs: the module, or a package's `__main__.py`."""
    origin = Path(importlib.util.find_spec(name).origin)
    return origin.with_name("__main__.py") if origin.name == "__init__.py" else origin


def tiny(command: str, out: Path) -> str:
    """The smallest form of a documented command; `out` is its own output folder."""
    words = shlex.split(command)
    if words[1].endswith("train.py"):
        sweep = "-m" in words
        # the main job and its resume share their run folder (logs/<run_name> under PROJECT_ROOT), where the
        # documented generate.py and evaluate.py commands read its checkpoint; every other run has a folder of its own
        shared = command.endswith(MAIN_JOB) or "ckpt_path=" in command
        where = [f"hydra.sweep.dir={out}"] if sweep else [] if shared else [f"hydra.run.dir={out}"]
        trials = ["hydra.sweeper.n_trials=2"] if "hparams_search=optuna" in words else []
        return shlex.join([*words, *TRAIN_TINY, *trials, *where])
    if words[1] == "generate.py":
        i = words.index("--tokens") if "--tokens" in words else None
        return shlex.join(words if i is None else [*words[: i + 1], "8", *words[i + 2:]])
    for flag, value in SHRINK.items():
        if flag in words:
            words[words.index(flag) + 1] = value
    if "--out" in words:
        words[words.index("--out") + 1] = str(out)
    elif words[1] == "-m" and words[2].startswith("experiments.") and not words[2].endswith(REPLOT):
        words += ["--out", str(out)]
    if words[1] == "-m" and words[2].startswith("experiments.") and not words[2].endswith(REPLOT):
        if "--mode" not in words and "--tiny" not in words:
            words.append("--tiny")
    return shlex.join(words)


def same(command: str) -> str:
    """Commands equal but for the interpreter's path (`.venv/bin/python` or `python`) run once."""
    return command.split(" ", 1)[1]


def run_order(command: str) -> int:
    """train.py commands first, the main job last among them, then its resume, then what reads its checkpoint
    (generate.py, evaluate.py), then the rest."""
    if "train.py" in command:
        return 2 if "ckpt_path=" in command else 1 if command.endswith(MAIN_JOB) else 0
    return 3 if "logs/" in command else 4


def copy_inputs(command: str, cwd: Path) -> None:
    """Copy the repository files and folders a command names (result files to re-plot, task folders) to the same
    place under `cwd`, so that the command reads them as written and writes its outputs there, not into the
    repository."""
    for word in shlex.split(command):
        src = ROOT / word
        if "/" in word and src.is_file():
            (cwd / word).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, cwd / word)
        elif "/" in word and src.is_dir() and not (cwd / word).exists():  # e.g. lm-eval's --include-path
            shutil.copytree(src, cwd / word)


def entry_point(command: str) -> str:
    """The module of `python -m module …`, else the script."""
    words = shlex.split(command)
    return words[2] if words[1] == "-m" else words[1]


def runs_here(command: str) -> bool:
    return not (SYNOPSIS.search(command) or command in PARSE_ONLY or command in NOT_RUN
                or entry_point(command) in TINY_RUN_ELSEWHERE)


def test_every_command_is_classified():
    commands = documented_commands()
    assert len(commands) > 20, commands  # the extraction still finds the documents' commands
    stale = (set(PARSE_ONLY) | set(NOT_RUN)) - {c for _, c in commands}
    assert not stale, f"PARSE_ONLY lists commands no document has any more: {sorted(stale)}"
    for module, (test_file, call) in TINY_RUN_ELSEWHERE.items():
        if module != "experiments.memory_tasks":
            assert call in (ROOT / "tests" / test_file).read_text(), f"{test_file} no longer runs {module} tiny"


def test_documented_commands_parse(tmp_path, monkeypatch):
    """Every documented command's arguments are accepted by its parser (Hydra or argparse), as written."""
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    for _, command in documented_commands():
        if SYNOPSIS.search(command) or command in NOT_RUN or " -m " in command and "train.py" in command:
            continue  # Hydra refuses --cfg with -m: the sweeps are run (two jobs each) by the next test
        copy_inputs(command, tmp_path)
        execute(command, tmp_path, parse_only=True)


@pytest.mark.slow
def test_documented_commands_run_tiny(tmp_path, monkeypatch):
    """Every documented command that is neither a synopsis nor in PARSE_ONLY runs to the end in its tiny form;
    train.py commands also write their final metrics. Commands run in document order after the train.py ones, so
    that `ckpt_path=last`, generate.py and evaluate.py find the checkpoint of `experiment=hope_small`."""
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    runnable = sorted({same(c): c for _, c in documented_commands() if runs_here(c)}.values(), key=run_order)
    for i, command in enumerate(runnable):
        copy_inputs(command, tmp_path)
        small = tiny(command, tmp_path / "out" / str(i))
        before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("metrics.json")}
        execute(small, tmp_path)
        if "train.py" in command:  # a new file, or (a resume, in its run's folder) the run's file written again
            written = [p for p in tmp_path.rglob("metrics.json") if before.get(p) != p.stat().st_mtime_ns]
            assert written, f"{small}: no metrics.json written"
