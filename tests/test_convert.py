"""`hope.convert`: Hope-Attention from a Transformer++ checkpoint or a Llama state dict computes the source's
function before any CMS write; other architectures and mismatched shapes are refused with a clear error."""

from __future__ import annotations

import pytest
import torch

from hope.convert import from_llama, main, to_hope_attention
from hope.training.inference import load_checkpoint
from hope.training.module import LMModule

PERIOD = 8


def write_checkpoint(path, name: str = "transformer", **config) -> LMModule:
    """A checkpoint as train.py writes it (state dict, hyper-parameters, run config) of a tiny `name` model."""
    torch.manual_seed(0)
    module = LMModule(preset=name, size="tiny", config=config)
    with torch.no_grad():  # away from the init, so that a copied tensor in the wrong place would show
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "hydra_config": {"data": {"tokenizer": "bytes"}}}, path)
    return module


def logits(model, ids):
    return model.eval()(ids).logits


def test_checkpoint_converts_to_the_same_logits_before_any_write(tmp_path):
    src = write_checkpoint(tmp_path / "src.ckpt").model.double()
    main([str(tmp_path / "src.ckpt"), str(tmp_path / "ha.ckpt"), "--periods", str(PERIOD), "--extra", "16,none"])
    converted = load_checkpoint(tmp_path / "ha.ckpt")[0].model.double()
    assert [lvl.period for lvl in converted.config.cms] == [PERIOD, 16, None]
    ids = torch.randint(0, 256, (2, 3 * PERIOD), generator=torch.Generator().manual_seed(1))
    a, b = logits(src, ids), logits(converted, ids)
    torch.testing.assert_close(b[:, :PERIOD], a[:, :PERIOD], rtol=0, atol=1e-12)  # first chunk: no write yet
    assert (b[:, PERIOD:] - a[:, PERIOD:]).abs().max() > 1e-4  # the writes at token 8 and 16 change what follows


def test_zero_inner_learning_rate_recovers_the_source_everywhere(tmp_path):
    src = write_checkpoint(tmp_path / "src.ckpt").model.double()
    converted = to_hope_attention(src, [PERIOD], [4], lr=0.0)
    ids = torch.randint(0, 256, (2, 5 * PERIOD), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(converted, ids), logits(src, ids), rtol=0, atol=1e-12)


def test_copied_levels_are_the_papers_stacking_and_change_the_function(tmp_path):
    src = write_checkpoint(tmp_path / "src.ckpt").model.double()
    converted = to_hope_attention(src, [PERIOD], [PERIOD], extra_init="copy")
    for block in converted.blocks:
        assert torch.equal(block.cms[0].w_down, block.cms[1].w_down)
    ids = torch.randint(0, 256, (1, PERIOD))
    assert (logits(converted, ids) - logits(src, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("name, found", [("hope", "HOPE"), ("titans", "Titans"), ("hope_attention", "Hope-Attention")])
def test_other_architectures_are_refused(tmp_path, name, found):
    write_checkpoint(tmp_path / "src.ckpt", name)
    with pytest.raises(ValueError, match=f"into Hope-Attention; this model is {found} "):
        main([str(tmp_path / "src.ckpt"), str(tmp_path / "out.ckpt")])
    assert not (tmp_path / "out.ckpt").exists()


def test_mismatched_shapes_and_bad_arguments_are_refused(tmp_path):
    write_checkpoint(tmp_path / "src.ckpt")
    ckpt = torch.load(tmp_path / "src.ckpt", weights_only=False)
    ckpt["state_dict"]["model.blocks.0.cms.0.w_up"] = torch.zeros(128, 7)
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"blocks.0.cms.0.w_up has shape \(128, 7\) in the file"):
        main([str(tmp_path / "bad.ckpt"), str(tmp_path / "out.ckpt")])
    src = load_checkpoint(tmp_path / "src.ckpt")[0].model
    with pytest.raises(ValueError, match=r"periods \[8, 16\] give 2 levels for the source's 1 MLP"):
        to_hope_attention(src, [8, 16])
    with pytest.raises(ValueError, match="extra_init must be one of"):
        to_hope_attention(src, [8], [8], extra_init="random")
    with pytest.raises(ValueError, match="a period is an int >= 2 or 'none', got 'x'"):
        main([str(tmp_path / "src.ckpt"), str(tmp_path / "out.ckpt"), "--periods", "x"])


def tiny_llama(**overrides):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, rms_norm_eps=1e-5, **overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():  # norms away from 1, so that a gain in the wrong place would show
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if "norm" in name else None
    return model, cfg


# the project's RoPE tables and RMSNorm are computed in fp32 (hope.layers.attention, hope.layers.norm) even for an
# fp64 model, while Llama's are fp64 here: fp32 round-off, not fp64's
LLAMA_TOL = {"rtol": 0, "atol": 1e-5}


@pytest.mark.parametrize("kv_heads, tied", [(4, False), (2, True)])
def test_llama_state_dict_gives_the_hf_models_logits(kv_heads, tied):
    hf, cfg = tiny_llama(num_key_value_heads=kv_heads, tie_word_embeddings=tied, rope_theta=500000.0)
    ours = from_llama(hf.state_dict(), cfg)
    assert ours.embed.weight.dtype == torch.float64 and ours.config.tie_embeddings is tied
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
    torch.testing.assert_close(logits(ours, ids), ref, **LLAMA_TOL)
    converted = to_hope_attention(ours, [12])
    torch.testing.assert_close(logits(converted, ids)[:, :12], ref[:, :12], **LLAMA_TOL)


def test_llama_folder_converts_from_the_command_line(tmp_path):
    hf, cfg = tiny_llama(num_key_value_heads=2)
    hf.save_pretrained(tmp_path / "llama")
    main([str(tmp_path / "llama"), str(tmp_path / "ha.ckpt"), "--periods", "8"])
    module, run_config = load_checkpoint(tmp_path / "ha.ckpt")
    assert run_config["data"]["tokenizer"] == f"hf:{tmp_path / 'llama'}"
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        ref = hf(ids).logits.float()
    torch.testing.assert_close(logits(module.model, ids), ref, rtol=0, atol=1e-4)  # load_checkpoint builds fp32


@pytest.mark.parametrize("overrides, match", [
    ({"attention_bias": True}, "'attention_bias': True"),
    ({"hidden_act": "gelu"}, "'hidden_act': 'gelu'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "'rope_type': 'linear'"),
    ({"head_dim": 32}, "'head_dim': 32"),
])
def test_llama_settings_without_an_exact_counterpart_are_refused(overrides, match):
    hf, cfg = tiny_llama(**overrides)
    with pytest.raises(ValueError, match=match):
        from_llama(hf.state_dict(), cfg)


def test_llama_shape_mismatch_and_other_model_types_are_refused():
    hf, cfg = tiny_llama()
    sd = dict(hf.state_dict())
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    with pytest.raises(ValueError, match=r"'layers.1.mlp.up_proj.weight' has shape \(95, 64\), the config implies "
                                         r"\(96, 64\)"):
        from_llama(sd, cfg)
    with pytest.raises(ValueError, match="model_type 'mistral'"):
        from_llama(sd, {**cfg.to_dict(), "model_type": "mistral"})
