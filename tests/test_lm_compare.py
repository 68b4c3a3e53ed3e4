"""experiments/lm_compare: variants, the training worker, and the tiny modes of compare, throughput and decode."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `experiments` is a folder of scripts at the repo root

from experiments.lm_compare import compare, decode, throughput, variants, worker  # noqa: E402
from hope import CMSLevel, HopeConfig, HopeLM, preset  # noqa: E402
from hope.cms import CMSSchedule  # noqa: E402


def tiny_overrides(name: str, steps: int = 2) -> list[str]:
    mode = {**compare.MODES["tiny"], "steps": steps}
    return [*variants.all_variants("tiny")[name].hydra_overrides(), *compare.common_overrides(mode, seed=0)]


def test_eval_interval_ends_on_the_last_step():
    assert [compare.eval_interval(n) for n in (1, 4, 7, 600, 1000)] == [1, 1, 7, 150, 250]
    with pytest.raises(ValueError, match="got 0"):
        compare.eval_interval(0)


def test_select_keeps_table_order_and_names_unknown_variants():
    assert [v.name for v in variants.select("tiny", "hope, transformer")] == ["transformer", "hope"]
    assert len(variants.select("tiny", None)) == len(variants.all_variants("tiny"))
    with pytest.raises(ValueError, match="'mamba'"):
        variants.select("tiny", "hope,mamba")


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_no_cms_ablation_keeps_the_parameter_budget(size):
    full = sum(p.numel() for p in HopeLM(preset("hope", size)).parameters())
    one = preset("hope", size, cms=[{"period": None, "hidden": variants.frozen_ffn_hidden(size)}])
    flat = sum(p.numel() for p in HopeLM(one).parameters())
    assert one.fast_periods == []
    assert abs(flat / full - 1) < 0.01  # only the two dropped RMSNorm gains per block differ


def test_every_variant_composes_into_the_model_it_names(tmp_path):
    from hydra.utils import instantiate

    built = {}
    for name in variants.all_variants("tiny"):
        cfg = worker.compose(tiny_overrides(name), tmp_path / name)
        assert cfg.trainer.max_steps == 2 and cfg.data.seq_len == 32 and cfg.seed == 0
        built[name] = instantiate(cfg.model, vocab_size=256).model_config
    assert built["transformer"].core == "attention" and built["hope"].core == "self_modifying"
    assert built["titans"].core == "titans" and len(built["hope_attention"].cms) == 3
    assert built["hope"].memory.erase == "dgd" and built["hope_gd"].memory.erase == "gd"
    assert built["hope_gd"].memory.eta_max == variants.gd_eta_max("tiny") == 2 / 64
    dgd = built["hope_dgd_small_step"].memory  # the control: DGD at GD's step
    assert dgd.erase == "dgd" and dgd.eta_max == built["hope_gd"].memory.eta_max
    assert built["hope_no_cms"].fast_periods == [] and len(built["hope"].fast_periods) == 2
    assert built["hope"].memory.self_targets and not built["hope_plain_targets"].memory.self_targets
    assert built["hope_mem_chunk16"].memory.chunk_size == 16 and built["hope"].memory.chunk_size == 64
    assert built["hope_proj_chunk64"].memory.proj_chunk_size == 64


def test_worker_trains_and_reports_curves_speed_and_memory(tmp_path):
    out = tmp_path / "transformer" / "result.json"
    worker.main(["--out", str(out), *tiny_overrides("transformer", steps=2)])
    r = json.loads(out.read_text())
    assert r["status"] == "ok" and r["steps"] == 2 and r["tokens_per_step"] == 64 and r["train_tokens"] == 128
    assert r["params"] == sum(p.numel() for p in HopeLM(preset("transformer", "tiny")).parameters())
    assert [s for s, _ in r["curves"]["train_loss"]] == [0, 1] and len(r["curves"]["val_bpb"]) == 2
    val = r["metrics"]
    assert 0 < val["val/bpb"] < 20 and math.isclose(val["val/ppl"], math.exp(val["val/loss"]), rel_tol=1e-4)
    assert r["train_tokens_per_s"] == pytest.approx(64 / r["median_step_s"]) and r["peak_rss_mib"] > 50


def test_worker_reports_a_missing_core_as_unavailable(tmp_path, monkeypatch):
    def missing(*_):
        raise ImportError("hope.layers.self_modifying has no SelfModifyingCore")

    monkeypatch.setattr(worker, "train", missing)
    out = tmp_path / "r.json"
    worker.main(["--out", str(out), "experiment=hope_small"])
    r = json.loads(out.read_text())
    assert r == {"status": "unavailable", "reason": "ImportError: hope.layers.self_modifying has no SelfModifyingCore"}


def fake_result(name: str, params: int, bpb: float, tok_s: float, status: str = "ok") -> dict:
    return {"name": name, "status": status, "params": params, "metrics": {"val/bpb": bpb, "val/ppl": 2.0},
            "train_tokens_per_s": tok_s, "peak_rss_mib": 100.0, "wall_s": 1.0, "reason": "boom"}


def test_table_flags_parameter_mismatch_and_checks_compare_hope_with_transformer():
    results = [fake_result("transformer", 1000, 2.0, 100.0), fake_result("hope", 1100, 1.9, 25.0),
               fake_result("titans", 0, 0, 0, status="failed")]
    _, rows = compare.summary_rows(results)
    assert rows[1][2] == "1.100 (!)" and rows[1][6] == 0.25 and rows[2][1:] == ["failed", *[None] * 7]
    assert compare.checks(results) == {"hope_bpb_below_transformer": True, "hope_tokens_per_s_ratio": 0.25,
                                       "params_ratio": 1.1}
    assert compare.checks(results[1:])["hope_bpb_below_transformer"] is None


@pytest.mark.slow
def test_compare_tiny_end_to_end(tmp_path):
    doc = compare.run(["--tiny", "--only", "transformer,hope_gd", "--out", str(tmp_path)])
    assert [r["name"] for r in doc["results"]] == ["transformer", "hope_gd"]
    assert all(r["status"] == "ok" for r in doc["results"]), [r.get("reason") for r in doc["results"]]
    assert doc["meta"]["machine"]["cpu_count"] >= 1 and doc["meta"]["machine"]["torch"] == torch.__version__
    assert doc["results"][0]["overrides"][2:] == doc["results"][1]["overrides"][4:]  # same data, steps, seed
    assert (tmp_path / "lm_compare.png").stat().st_size > 0
    assert "| hope_gd |" in (tmp_path / "lm_compare.md").read_text()
    # --collect trains nothing: the finished runs come back as they were, the others are marked missing
    again = compare.run(["--tiny", "--only", "transformer,hope,hope_gd", "--out", str(tmp_path), "--collect"])
    assert [r["status"] for r in again["results"]] == ["ok", "missing", "ok"]
    assert again["results"][2]["metrics"] == doc["results"][1]["metrics"]
    other = compare.run(["--tiny", "--steps", "3", "--only", "transformer", "--out", str(tmp_path), "--collect"])
    assert other["results"][0]["status"] == "missing"  # trained for 4 steps, not 3


def test_throughput_tiny_writes_ratios_to_transformer(tmp_path):
    doc = throughput.run(["--tiny", "--models", "transformer,hope", "--steps", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "throughput.json").read_text())
    assert saved["results"].keys() == {"transformer", "hope"} and saved["config"]["steps"] == 2
    ref, hope = saved["results"]["transformer"], saved["results"]["hope"]
    assert ref["ratio_vs_transformer"] == 1.0 and ref["ratio_per_round"] == [1.0, 1.0]
    assert hope["tokens_per_s"] == pytest.approx(64 / hope["median_step_s"]) and len(hope["step_s"]) == 2
    # each round's ratio pairs the two models' steps of that round
    assert hope["ratio_per_round"] == pytest.approx([a / b for a, b in zip(ref["step_s"], hope["step_s"])])
    assert hope["ratio_range"] == [min(hope["ratio_per_round"]), max(hope["ratio_per_round"])]
    assert len(saved["loadavg_start"]) == 3 and doc["table"] == saved["table"]


def test_throughput_refuses_a_model_with_non_finite_gradients():
    model = HopeLM(preset("transformer", "tiny"))
    with torch.no_grad():
        model.embed.weight[0, 0] = float("nan")
    tr = throughput.Trainee("transformer", model, 0, batch=1, seq_len=8, seed=0)
    tr.ids.zero_()  # token 0 is read, so the NaN reaches the loss
    with pytest.raises(RuntimeError, match="'transformer': loss nan"):
        tr.step(check=True)


def test_write_clock_charges_each_blocks_cms_writes_to_its_model():
    """`WriteClock` reads the public profiler region: every write region entered inside `charge(name)` counts."""
    from hope.cms.profile import write_region

    clock = throughput.WriteClock()
    with clock.charge("hope") as timer:
        for _ in range(2):
            with write_region():
                time.sleep(0.01)
    with clock.charge("transformer") as none:
        pass  # no CMS, no write
    with clock.charge("hope"):
        with write_region():
            time.sleep(0.01)
    assert timer.writes == 2 and 0.02 <= timer.seconds < clock.seconds["hope"]
    assert none.writes == 0 and clock.seconds["transformer"] == 0.0
    with write_region():  # outside every charge: nobody pays
        pass
    assert clock.seconds.keys() == {"hope", "transformer"} and timer.writes == 2


def test_measure_records_each_timed_steps_cms_writes():
    from hope.cms.profile import write_region

    class Stepper:
        def __init__(self, name: str, writes: int) -> None:
            self.name, self.writes, self.times, self.write_times = name, writes, [], []

        def step(self) -> None:
            for _ in range(self.writes):
                with write_region():
                    time.sleep(0.005)

    trainees = [Stepper("transformer", 0), Stepper("hope", 2)]
    clock = throughput.WriteClock()
    throughput.measure(trainees, warmup=1, steps=2, clock=clock)
    plain, hope = trainees
    assert plain.write_times == [0.0, 0.0] and len(hope.write_times) == len(hope.times) == 2
    assert all(0.01 <= w <= t for w, t in zip(hope.write_times, hope.times))
    assert clock.seconds["hope"] >= sum(hope.write_times) + 0.01  # the warm-up round is charged too, not recorded


def test_decode_tiny_state_is_flat_for_recurrent_cores_and_grows_for_the_transformer(tmp_path):
    decode.run(["--tiny", "--models", "transformer,titans", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "decode.json").read_text())
    assert saved["config"]["write_cycle"] == 1 and saved["config"]["new_tokens"] == 64  # no CMS: no write cycle
    rows = {name: r["by_context"] for name, r in saved["results"].items()}
    assert rows["titans"][0]["state_mib"] == rows["titans"][1]["state_mib"]
    assert rows["transformer"][1]["state_mib"] == pytest.approx(832 / 320 * rows["transformer"][0]["state_mib"], 1e-3)
    assert all(row["tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0 for r in rows.values() for row in r)
    assert (tmp_path / "decode.png").stat().st_size > 0


@pytest.mark.slow
def test_decode_tiny_hope_amortizes_whole_write_cycles(tmp_path):
    decode.run(["--tiny", "--models", "transformer,hope", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "decode.json").read_text())
    rows = {name: r["by_context"] for name, r in saved["results"].items()}
    assert [row["context"] for row in rows["hope"]] == [256, 768] and saved["config"]["write_cycle"] == 256
    assert rows["hope"][0]["state_mib"] == rows["hope"][1]["state_mib"]  # fixed-size memory
    assert rows["transformer"][1]["state_mib"] == pytest.approx(2 * rows["transformer"][0]["state_mib"], 1e-3)


def test_decode_window_holds_the_writes_of_the_chunks_it_generates(monkeypatch):
    """The timed window [L, L + N) pays, once each, the writes of the chunks generated inside it, all replays of
    one-token calls: not the prefill's last writes, which the model leaves due at L. A replay of the period-8 chunk
    takes the period-4 write at its middle from the stream instead of making it again."""
    torch.manual_seed(0)
    cms = [CMSLevel(period=4, hidden=16), CMSLevel(period=8, hidden=16), CMSLevel(hidden=16)]
    model = HopeLM(HopeConfig(vocab_size=23, d_model=32, n_layers=2, n_heads=2, cms=cms, ffn_hidden=48)).eval()
    events, replaying = [], []
    write, replay, prefill = CMSSchedule._write, CMSSchedule._replay_write, decode.Stream.prefill

    def counted_write(self, periods, state):
        events.append(("write in replay" if replaying else "write", *periods))
        return write(self, periods, state)

    def counted_replay(self, step, C, *args):
        events.append(("replay", C))
        replaying.append(C)
        try:
            return replay(self, step, C, *args)
        finally:
            replaying.pop()

    def marked_prefill(self, *args):
        rate = prefill(self, *args)
        events.append("window")  # the timed steps start here
        return rate

    monkeypatch.setattr(CMSSchedule, "_write", counted_write)
    monkeypatch.setattr(CMSSchedule, "_replay_write", counted_replay)
    monkeypatch.setattr(decode.Stream, "prefill", marked_prefill)
    decode.sweep_contexts([decode.Stream("hope", model, seed=0)], [16], n_new=8, chunk=16)
    window = events[events.index("window") + 1:]
    # due at 20; then at 24 (timed with the last step), where the period-8 replay also makes the period-4 write
    assert window == [("replay", 4), ("write in replay", 4), ("replay", 8), ("write in replay", 4, 8)]


@pytest.mark.parametrize("bad, match", [
    (["--contexts", "100,256"], "multiples of 256"),
    (["--new-tokens", "10"], "multiples of 256"),
    (["--contexts", "512,256"], "ascending"),
    (["--contexts", "256,512", "--new-tokens", "512"], "closer than"),
    (["--models", "hope,rwkv"], "'rwkv'"),
    (["--models", "transformer", "--new-tokens", "0"], "multiples of 1 "),
])
def test_decode_rejects_contexts_that_break_the_cms_write_cycle(bad, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        decode.run(["--tiny", "--out", str(tmp_path), *bad])


def test_compare_rejects_a_bad_thread_count():
    with pytest.raises(ValueError, match="--threads must be a positive int, got 0"):
        compare.run(["--tiny", "--only", "transformer", "--threads", "0"])


def test_throughput_cms_breakdown_times_the_writes(tmp_path):
    doc = throughput.run(["--tiny", "--models", "transformer,hope", "--steps", "1", "--seq-len", "128",
                          "--cms-breakdown", "--out", str(tmp_path)])
    r = doc["results"]
    assert list(r) == ["transformer", "hope", "hope[frozen CMS]", "hope[one level, period 256]",
                       "hope[residual signal]", "hope_fast", "hope[learned η]", "hope[second-order CMS]", "hope_paper"]
    assert r["hope"]["median_cms_write_s"] > 0  # 128 tokens: the period-64 level writes once
    assert r["hope[residual signal]"]["median_cms_write_s"] > 0 and r["hope_fast"]["median_cms_write_s"] > 0
    assert r["hope[frozen CMS]"]["median_cms_write_s"] == 0  # no fast level, no write
    assert r["hope[one level, period 256]"]["median_cms_write_s"] == 0  # its first write would be at token 256
    assert r["hope"]["median_cms_write_s"] < r["hope"]["median_step_s"]
    for name in ("hope[frozen CMS]", "hope[residual signal]", "hope_fast", "hope[second-order CMS]"):
        assert r[name]["params"] == r["hope"]["params"]  # same widths: only periods, write signal or chunks differ
    fast_levels = sum(lvl.period is not None for lvl in preset("hope", "tiny").cms) * preset("hope", "tiny").n_layers
    assert r["hope[learned η]"]["params"] == r["hope"]["params"] + fast_levels  # one ρ per fast level and block
    assert r["hope[second-order CMS]"]["median_cms_write_s"] > 0
    assert "| hope[frozen CMS] |" in doc["table"]
