"""The LM optimizer comparison (`experiments/optimizers/lm_compare_optimizers.py`): tiny end-to-end run and its parts.

Dimensions: none (curves are lists of [step, seconds, loss]).
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from experiments.common.trainer import compose_train
from experiments.optimizers import lm_compare_optimizers as lmo
from experiments.optimizers.plot_lm import trailing_mean


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One `--tiny` run of every default model and optimizer (seconds); its JSON document and output directory."""
    out = tmp_path_factory.mktemp("lm_optimizers")
    doc = lmo.main(["--tiny", "--out", str(out)])
    return doc, out


def test_tiny_writes_json_png_and_every_run(tiny):
    doc, out = tiny
    assert (out / "lm_optimizers.json").is_file() and (out / "lm_optimizers.png").stat().st_size > 10_000
    assert doc["mode"] == "tiny" and doc["meta"]["machine"]["torch"] == torch.__version__
    assert doc["command"].startswith("python -m experiments.optimizers.lm_compare_optimizers --tiny")
    assert len(doc["loadavg_start"]) == 3 and doc["meta"]["date"]
    pairs = {(r["model"], r["optimizer"]) for r in doc["results"]}
    models = [m for m in ("transformer", "hope") if any(r["model"] == m and r["status"] != "skipped"
                                                         for r in doc["results"])]
    assert "transformer" in models
    assert pairs == {(m, o) for m in ("transformer", "hope") for o in lmo.OPTIMIZERS}
    for r in doc["results"]:
        if r["model"] not in models:
            continue
        assert r["status"] == "ok", r.get("reason")
        assert [c[0] for c in r["curve"]] == [1, 2, 3, 4]
        times = [c[1] for c in r["curve"]]
        assert all(b > a for a, b in zip(times, times[1:])) and r["train_wall_s"] == times[-1]
        assert all(math.isfinite(c[2]) for c in r["curve"])
        assert 0 < r["val_bpb"] < 20 and r["val_curve"][-1][0] == 4
    for model in ("transformer", "hope"):
        assert f"| {model} | m3 |" in doc["table"]


def test_tiny_same_seed_and_data_for_every_optimizer(tiny):
    """The loss of step 1 is computed before any update: equal across optimizers iff init and batch are equal."""
    doc, _ = tiny
    for model in ("transformer", "hope"):
        first = [r["curve"][0][2] for r in doc["results"] if r["model"] == model and r["status"] == "ok"]
        assert len(set(first)) <= 1, first
        later = {r["curve"][-1][2] for r in doc["results"] if r["model"] == model and r["status"] == "ok"}
        assert len(later) == len(first)  # the optimizers did act, differently


def test_overrides_reproduce_the_settings_and_equalise_decay_and_fallback_lr(tmp_path):
    """The recorded `train.py` overrides give the config each run trained with; every optimizer shrinks weights by
    AdamW's lr·wd per step; Muon/M3's fallback (embeddings, 1-D gains) runs at AdamW's lr."""
    from omegaconf import OmegaConf

    from hope.training.run import build_module

    shared = [*lmo.shared_overrides("transformer", lmo.MODES["tiny"], seed=0), "model.lr_decay_steps=4"]
    base = compose_train(shared)
    for name in lmo.OPTIMIZERS:
        lr = 1e-4 if name == "m3" else 3e-2
        cfg = lmo.run_config(base, lmo.optimizer_settings(name, lr), tmp_path, tmp_path / "clock.json")
        assert cfg.callbacks.loss_clock.path == str(tmp_path / "clock.json") and "loss_clock" not in base.callbacks
        recorded = compose_train([*shared, *lmo.optimizer_overrides(name, lr)])
        assert OmegaConf.to_container(recorded.model) == OmegaConf.to_container(cfg.model)
        assert cfg.model.optimizer == name and base.model.optimizer == "adamw"
        module = build_module(cfg, 256, torch.ones(256, dtype=torch.long))
        decay, rest = module.configure_optimizers()["optimizer"].param_groups
        assert decay["initial_lr"] * decay["weight_decay"] == pytest.approx(lmo.DECAY_PER_STEP, rel=1e-12)
        assert rest["weight_decay"] == 0.0
        if name in lmo.MATRIX_OPTIMIZERS:
            assert rest["matrix"] is False
            assert rest["initial_lr"] * rest["fallback_lr_scale"] == pytest.approx(lmo.ADAMW_LR, rel=1e-12)


def test_sweep_runs_each_multiple_and_picks_the_best(tmp_path):
    doc = lmo.main(["--tiny", "--steps", "2", "--models", "transformer", "--optimizers", "adamw", "--sweep", "0.5,2",
                    "--out", str(tmp_path)])
    assert (tmp_path / "lm_optimizers_sweep.json").is_file() and (tmp_path / "lm_optimizers_sweep.png").is_file()
    lrs = [r["lr"] for r in doc["results"]]
    assert lrs == pytest.approx([0.5 * lmo.ADAMW_LR, 2 * lmo.ADAMW_LR])
    losses = {r["lr"]: r["final_loss"] for r in doc["results"]}
    best = doc["best_lr"]["transformer/adamw"]
    assert best["final_loss"] == min(losses.values()) and losses[best["lr"]] == best["final_loss"]


def test_unavailable_model_rows_are_skipped_with_the_reason(tmp_path, monkeypatch, capsys):
    import experiments.common.models as models

    real = models.build_model

    def fake(name, *args, **kwargs):
        if name == "hope":
            raise models.ModelUnavailable("model 'hope' is not available: no module self_modifying")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(models, "build_model", fake)
    doc = lmo.main(["--tiny", "--steps", "1", "--models", "transformer,hope", "--optimizers", "adamw",
                    "--out", str(tmp_path)])
    rows = {r["model"]: r for r in doc["results"]}
    assert rows["transformer"]["status"] == "ok"
    assert rows["hope"]["status"] == "skipped" and "self_modifying" in rows["hope"]["reason"]
    assert "[skip] hope" in capsys.readouterr().out
    assert "| hope | adamw | 0.003 | skipped |" in doc["table"]


def test_loss_clock_excludes_validation_time(tmp_path, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(lmo.time, "perf_counter", lambda: now[0])
    clock = lmo.LossClock(str(tmp_path / "c.json"))
    trainer = SimpleNamespace(global_step=0, callback_metrics={}, state=SimpleNamespace(fn="fit"))
    clock.on_train_start(trainer, None)
    for step, (train_s, val_s) in enumerate([(1.0, 0.0), (2.0, 5.0), (1.0, 0.0)], start=1):
        clock.on_train_batch_start(trainer, None, None, step - 1)
        now[0] += train_s
        trainer.global_step = step
        clock.on_train_batch_end(trainer, None, {"loss": torch.tensor(float(step))}, None, step - 1)
        if val_s:
            clock.on_validation_start(trainer, None)
            now[0] += val_s
            trainer.callback_metrics = {"val/bpb": torch.tensor(2.5)}
            clock.on_validation_end(trainer, None)
    clock.on_train_end(trainer, None)
    rec = json.loads((tmp_path / "c.json").read_text())
    assert rec["curve"] == [[1, 1.0, 1.0], [2, 3.0, 2.0], [3, 4.0, 3.0]]
    assert rec["val"] == [[2, 3.0, 2.5]] and rec["step_s"] == [1.0, 2.0, 1.0]


def test_final_loss_and_trailing_mean():
    curve = [[s, 0.1 * s, float(v)] for s, v in enumerate(range(20, 0, -1), start=1)]
    assert lmo.final_loss(curve) == pytest.approx((2 + 1) / 2)  # last 10% of 20 steps = 2 steps
    assert lmo.final_loss(curve[:3]) == 18.0 and lmo.final_loss([]) is None
    assert lmo.final_loss([[1, 0.1, 3.0], [2, 0.2, float("nan")]]) is None
    values = [float(v) for v in torch.randn(37, generator=torch.Generator().manual_seed(0))]
    for window in (1, 4, 50):
        ref = [sum(values[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(values))]
        assert trailing_mean(values, window) == pytest.approx(ref, rel=1e-12)
    with pytest.raises(ValueError, match="window"):
        trailing_mean(values, 0)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--models", "gpt2"], "gpt2"),
        (["--optimizers", "adamw,lion"], "lion"),
        (["--optimizers", "adamw,adamw"], "adamw,adamw"),
        (["--lrs", "m3"], "'m3'"),
        (["--lrs", "sophia=1e-3"], "sophia"),
        (["--lrs", "m3=-1"], "-1"),
        (["--sweep", "1,zero"], "1,zero"),
        (["--steps", "0"], "--steps must be a positive int, got 0"),
        (["--seq-len", "-8"], "-8"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_bad_flags_name_the_value(argv, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        lmo.main(["--tiny", "--out", str(tmp_path), *argv])


def test_optimizer_overrides_reject_bad_input():
    with pytest.raises(ValueError, match="'lion'"):
        lmo.optimizer_overrides("lion", 1e-3)
    for bad in (0.0, -1e-3, float("nan"), "1e-3"):
        with pytest.raises(ValueError, match="learning rate"):
            lmo.optimizer_overrides("adamw", bad)


def test_plot_lm_pools_several_results_and_rejects_other_json(tiny, tmp_path):
    from experiments.optimizers import plot_lm

    _, out = tiny
    png = plot_lm.main([str(out / "lm_optimizers.json"), str(out / "lm_optimizers.json"), "--png",
                        str(tmp_path / "two.png")])
    assert png.stat().st_size > 10_000
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "toy"}))
    with pytest.raises(ValueError, match="other.json"):
        plot_lm.main([str(tmp_path / "other.json")])
