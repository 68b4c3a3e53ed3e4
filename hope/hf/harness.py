"""lm-evaluation-harness for HOPE: the harness's `HFLM` over `HopeForCausalLM`, registered as model "hope".

    python evaluate.py out/hope_small_hf --tasks piqa,hellaswag --device cuda
    python evaluate.py logs/hope_small/checkpoints/last.ckpt --tasks hope_tiny_choice --include-path tests/data/lm_eval
    python -m hope.hf.harness --model hope --model_args pretrained=out/hope_small_hf --tasks piqa  # lm-eval's CLI

Log-likelihood requests reach the model as right-padded batches without a mask (causal: the padding after a
continuation cannot change its logits); generation requests as left-padded batches with a mask, whose padding
never reaches the model (hope.hf.cache). Needs the `eval` extra (`pip install -e ".[eval]"`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    import lm_eval
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
except ImportError as err:
    raise ImportError(f"hope.hf.harness needs lm-evaluation-harness; install the extra: pip install -e '.[eval]' "
                      f"({err})") from err

import hope.hf  # noqa: F401  (registers "hope" with AutoModelForCausalLM, which HFLM loads through)
from hope.hf.export import from_checkpoint


class HopeHarnessLM(HFLM):
    """`HFLM` for HOPE models: `pretrained` is a Hugging Face directory or Hub name of a `HopeForCausalLM`, or a
    model instance (then `tokenizer` is needed too). Every other argument is HFLM's."""

    def __init__(self, pretrained: Any, **kwargs: Any) -> None:
        kwargs.setdefault("backend", "causal")
        super().__init__(pretrained=pretrained, **kwargs)


if __name__ != "__main__":  # run as a script, the class is registered once, by importing this module below
    register_model("hope")(HopeHarnessLM)


def check_model_path(path: str) -> None:
    """Raise a ValueError naming `path` unless it is an existing file or directory, or reads as a Hub name."""
    if Path(path).exists():
        return
    if path.endswith(".ckpt") or path.startswith(("/", ".", "~")) or path.count("/") != 1:
        raise ValueError(f"model {path!r} does not exist; expected a train.py checkpoint (*.ckpt), a directory "
                         "written by `python -m hope.hf.export`, or a Hub name (owner/name)")


def load_harness_model(path: str, device: str = "cpu", batch_size: int = 1, max_length: int | None = None) -> HFLM:
    """A train.py checkpoint (`*.ckpt`), a local Hugging Face directory or a Hub name, ready for `simple_evaluate`.
    `max_length`: the longest context in tokens (the harness truncates longer ones from the left); None takes the
    tokenizer's `model_max_length` (the model's `max_seq_len` when exported by hope.hf.export), else the harness's
    default of 2048."""
    check_model_path(path)
    if path.endswith(".ckpt"):
        model, tokenizer = from_checkpoint(path)
        return HopeHarnessLM(model.to(device), tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    try:
        return HopeHarnessLM(path, device=device, batch_size=batch_size, max_length=max_length)
    except OSError as e:  # not on the Hub, or no network: transformers' message says which
        raise ValueError(f"model {path!r} is not a local path and could not be loaded from the Hugging Face Hub: "
                         f"{str(e).splitlines()[0]}") from e


def task_manager(tasks: list[str], include_path: str | None = None) -> TaskManager:
    """The task index that holds `tasks`: the YAMLs under `include_path` alone when they hold every task (indexing
    the harness's own ~15,000 tasks takes seconds), else those and the harness's own; a ValueError names the
    tasks found in neither."""
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or under {include_path!r}" if include_path else " (add --include-path DIR for local task YAMLs)"
        raise ValueError(f"unknown lm-eval task(s) {unknown}: not in lm-evaluation-harness {lm_eval.__version__}"
                         f"{where}")
    return manager


def evaluate_tasks(
    model: HFLM, tasks: list[str], manager: TaskManager, num_fewshot: int | None = None, limit: int | None = None,
    seed: int = 0, log_samples: bool = False,
) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` on `tasks` of `manager` (`task_manager`), every seed of the harness set to `seed`."""
    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=manager, num_fewshot=num_fewshot,
                                   limit=limit, log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                                   torch_random_seed=seed, fewshot_random_seed=seed)


if __name__ == "__main__":  # lm-eval's own command line, with model "hope" registered
    from lm_eval.__main__ import cli_evaluate

    import hope.hf.harness  # noqa: F401  (registers "hope" once, however often this script is run in a process)

    cli_evaluate()
