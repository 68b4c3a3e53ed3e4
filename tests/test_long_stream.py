"""experiments/continual/long_stream: the loss-by-position and norm readers, their smoke runs, and the bound on
every fast memory over a 64K-token stream."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.common.models import load_checkpoints
from experiments.continual import long_stream
from hope import HopeLM, preset


def tiny_stream_model(core: str = "self_modifying", **overrides) -> HopeLM:
    """`experiment=hope_stream_small`'s preset at the tiny size (CMS periods 64, 512, 4096 with decay 1/16; a
    self-modifying core carried, retaining toward its initial state), with another `core` if given."""
    torch.manual_seed(0)
    if core != "self_modifying":
        overrides = {"core": core, **overrides}  # an attention core ignores the memory settings
    return HopeLM(preset("hope_stream", "tiny", **overrides)).eval()


def test_read_stream_carried_equals_one_call_when_nothing_is_cut():
    """Reset at every window = independent windows; carried with windows as long as the stream = one call."""
    model = tiny_stream_model("attention")
    ids = torch.randint(0, 256, (2, 257), generator=torch.Generator().manual_seed(1))
    whole = long_stream.read_stream(model, ids, 256, carry=True)
    with torch.no_grad():
        logits = model(ids[:, :256]).logits.float()
    ref = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    assert torch.allclose(whole, ref, atol=1e-5)
    reset = long_stream.read_stream(model, ids, 128, carry=False)
    with torch.no_grad():
        second = model(ids[:, 128:256]).logits.float()
    ref2 = torch.nn.functional.cross_entropy(second.transpose(1, 2), ids[:, 129:257], reduction="none")
    assert torch.allclose(reset[:, 128:], ref2, atol=1e-5)


def test_bucket_means_cover_the_stream():
    losses = torch.arange(20000, dtype=torch.float32)[None]
    means = long_stream.bucket_means(losses, 20000)
    assert list(means) == ["0–512", "512–2K", "2K–8K", "8K–16K", "16K–20000"]
    assert means["0–512"] == pytest.approx(255.5)


def test_stream_presets_are_their_models_configured_for_streams():
    """`hope_stream` (experiment=hope_stream_small) is `hope` with the CMS spanning the stream and the core carried,
    `transformer_stream` is Transformer++ with a one-window KV cache; each has its model's parameters."""
    from experiments.common.models import count_params

    for size in ("tiny", "small"):
        cfg = preset("hope_stream", size)
        assert [(lvl.period, lvl.decay) for lvl in cfg.cms] == [(64, 1 / 16), (512, 1 / 16), (4096, 1 / 16)]
        assert cfg.persist and cfg.carry_core and cfg.memory.retain_toward == "init"
        assert [lvl.hidden for lvl in cfg.cms] == [lvl.hidden for lvl in preset("hope", size).cms]
        for stream, base in (("hope_stream", "hope"), ("transformer_stream", "transformer")):
            assert count_params(HopeLM(preset(stream, size))) == count_params(HopeLM(preset(base, size)))
    cfg = preset("transformer_stream", "small")
    assert cfg.persist and cfg.kv_cache == 512 and preset("transformer_stream", "small", kv_cache=256).kv_cache == 256


def test_every_fast_memory_stays_bounded_over_64k_tokens():
    """An untrained tiny HOPE with the stream configuration (CMS periods 64, 512, 4096 with retention 1/16, the
    core carried and retaining toward its initial state) reads 64K random bytes with its state carried in
    512-token windows: no memory's norm ever exceeds 4× its largest over the first 4K tokens, and no core memory
    falls below a quarter of its smallest there (retaining toward zero, they decay to 0 within 4K tokens:
    tests/test_retain_toward_init.py)."""
    model = tiny_stream_model()
    ids = torch.randint(0, 256, (1, 1 << 16), generator=torch.Generator().manual_seed(2))
    tokens, series = long_stream.track_norms(model, ids, 512)
    assert tokens[-1] == 1 << 16 and len(series) == 10  # per block: proj.S, mem.S and three CMS levels
    for key, norms in series.items():
        early = norms[:8]
        assert all(torch.isfinite(torch.tensor(norms))), key
        assert max(norms) <= 4 * max(early), (key, max(early), max(norms))
        if key.endswith(".S"):
            assert min(norms) >= min(early) / 4, (key, min(early), min(norms))


@pytest.mark.parametrize("command", ["eval", "norms", "cost"])
def test_smoke_runs_write_their_results(command, tmp_path):
    path = long_stream.main([command, "--tiny", "--out", str(tmp_path)])
    doc = json.loads(path.read_text())
    assert doc["mode"] == "tiny" and "commit" in json.dumps(doc) and path.with_suffix(".png").is_file()


def test_norms_replot_redraws_from_the_json_alone(tmp_path):
    path = long_stream.main(["norms", "--tiny", "--out", str(tmp_path)])
    png = path.with_suffix(".png")
    png.unlink()
    assert long_stream.main(["norms", "--replot", str(path)]) == png and png.stat().st_size > 0
    with pytest.raises(SystemExit, match="no such file"):
        long_stream.main(["norms", "--replot", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match="'eval'"):
        long_stream.main(["eval", "--replot", str(path)])


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit, match="--ckpt"):
        long_stream.main(["eval"])
    with pytest.raises(ValueError, match="NAME=PATH"):
        load_checkpoints(["no-equals-sign"])
    with pytest.raises(FileNotFoundError, match="hope"):
        load_checkpoints(["hope=/nonexistent.ckpt"])
