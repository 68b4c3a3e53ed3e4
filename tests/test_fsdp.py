"""FSDP (configs/trainer/fsdp.yaml, hope/training/parallel.py): trained under `HopeWrapPolicy` on two CPU processes
(gloo), HOPE (whose CMS levels write in the forward pass: inner `torch.autograd.grad`, one FSDP unit) and
Transformer++ (one unit per block) give the losses and weights of one process on the whole batch.

torch 2.13's FSDP runs on CPU when given `device_id=torch.device("cpu")`; Lightning's `FSDPStrategy` passes
`device_id=None` on CPU, which FSDP refuses ("FSDP needs a non-CPU accelerator device"), so the two-process run
uses `torch.distributed.fsdp` directly with the policy the config gives Lightning.

Run by the test as `python -m torch.distributed.run --nproc_per_node 2 tests/test_fsdp.py <out.json>`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_two_ranks

ROOT = Path(__file__).resolve().parents[1]
B, T, STEPS, LR = 4, 160, 3, 0.5  # T crosses the period-64 writes twice and ends inside a period-64 chunk


MODELS = ("hope", "transformer")


def _model(name: str):
    from hope.config import preset
    from hope.models.lm import HopeLM

    torch.manual_seed(0)
    return HopeLM(preset(name, "tiny", vocab_size=64, n_layers=2))


def _batch() -> torch.Tensor:
    return torch.randint(0, 64, (B, T + 1), generator=torch.Generator().manual_seed(1))  # [B, T+1]


def _train(model, ids: torch.Tensor) -> list[float]:
    """STEPS of SGD on the mean next-token loss of `ids`; returns each step's loss."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        logits = model(ids[:, :-1]).logits  # [b, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def _worker(out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from hope.training.parallel import HopeWrapPolicy

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name in MODELS:
        model = FSDP(_model(name), auto_wrap_policy=HopeWrapPolicy(), device_id=torch.device("cpu"),
                     use_orig_params=True)
        units = sum(isinstance(m, FSDP) for m in model.modules())
        rows = _batch().chunk(world)[rank]  # this rank's B / W rows
        losses = torch.stack(_train(model, rows))
        dist.all_reduce(losses)  # every rank's loss is a mean over as many tokens: their mean is the batch's
        cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)  # offload on CPU segfaults (torch 2.13)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, cfg):
            state = model.state_dict()
        results[name] = {"losses": (losses / world).tolist(), "state": state, "units": units}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_hope_wrap_policy_units() -> None:
    from hope.config import preset
    from hope.models.lm import HopeLM
    from hope.training.parallel import HopeWrapPolicy, fsdp_units

    assert fsdp_units(HopeLM(preset("hope", "tiny", vocab_size=64, n_layers=2))) == []  # CMS writes: root only
    transformer = HopeLM(preset("transformer", "tiny", vocab_size=64, n_layers=2))
    assert fsdp_units(transformer) == list(transformer.blocks)  # no writes: one unit per block
    titans = HopeLM(preset("titans", "tiny", vocab_size=64, n_layers=2))
    assert fsdp_units(titans) == list(titans.blocks)
    with pytest.raises(ValueError, match="shards the HopeBlocks of a HopeLM, got a Linear without any"):
        HopeWrapPolicy()._run_policy(torch.nn.Linear(2, 2), set(), {})


def test_fsdp_config_gives_lightning_the_policy() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy

    from hope.training.parallel import HopeWrapPolicy

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer=fsdp"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert isinstance(strategy.kwargs["auto_wrap_policy"], HopeWrapPolicy) and strategy.kwargs["use_orig_params"]
    GlobalHydra.instance().clear()


@pytest.mark.slow
def test_fsdp_two_cpu_processes_match_one(tmp_path) -> None:
    out = tmp_path / "fsdp.pt"
    run_two_ranks(__file__, str(out))
    results = torch.load(out, weights_only=True)
    assert results["hope"]["units"] == 1 and results["transformer"]["units"] == 1 + 2  # root (+ one per block)
    for model in MODELS:
        got, ref = results[model], _model(model)
        ref_losses = [float(x) for x in _train(ref, _batch())]
        assert got["losses"] == pytest.approx(ref_losses, rel=1e-5), model
        assert ref_losses[-1] < ref_losses[0]  # the steps did train
        ref_state = ref.state_dict()
        assert sorted(got["state"]) == sorted(ref_state)
        for name, value in ref_state.items():
            err = (got["state"][name] - value).norm() / value.norm().clamp_min(1e-12)
            assert err < 1e-5, f"{model} {name}: relative error {err:.2e}"


if __name__ == "__main__":
    _worker(sys.argv[1])
