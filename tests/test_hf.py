"""Hugging Face integration (hope.hf): the cache continues streams exactly, padding never reaches the model,
`generate` agrees with `HopeLM.generate`, save/load round-trips, and a train.py checkpoint converts in one command."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hope.config import preset  # noqa: E402
from hope.data.tokenizers import ByteTokenizer  # noqa: E402
from hope.hf import HopeCache, HopeForCausalLM, HopeHFConfig, hf_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CMS = [{"period": 8, "hidden": 32}, {"period": None, "hidden": 32}]
PRESETS = {  # depth 1 (width 64): Transformer++, Titans, Hope-Attention and HOPE with an in-context CMS level
    "transformer": {},
    "titans": {},
    "hope_attention": {"cms": CMS},
    "hope": {"cms": CMS},
}


def tiny(name: str = "hope", seed: int = 0) -> HopeForCausalLM:
    torch.manual_seed(seed)
    config = HopeHFConfig.from_hope(preset(name, 1, vocab_size=256, **PRESETS[name]), pad_token_id=0)
    return HopeForCausalLM(config).eval()


@pytest.mark.parametrize("name", PRESETS)
@torch.no_grad()
def test_feeding_pieces_with_the_cache_gives_the_full_forward(name):
    model = tiny(name)
    ids = torch.randint(0, 256, (2, 19))  # crosses two CMS boundaries (period 8)
    full = model(ids).logits
    out = model(ids[:, :5])
    pieces = [out.logits]
    for a, b in [(5, 6), (6, 13), (13, 19)]:  # one token, then longer pieces
        out = model(ids[:, a:b], cache=out.cache)
        pieces.append(out.logits)
    assert out.cache.get_seq_length() == 19
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["hope", "transformer"])
@torch.no_grad()
def test_left_padding_never_reaches_the_model(name):
    model = tiny(name)
    rows = [torch.randint(0, 256, (n,)) for n in (12, 7, 12, 1)]  # rows 0 and 2 share one state
    T = 12
    ids = torch.full((4, T), 0, dtype=torch.long)
    mask = torch.zeros(4, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    ids[1, :5] = 255  # what the padding holds must not matter
    out = model(ids, attention_mask=mask)
    assert len(out.cache.groups) == 3
    nxt = torch.randint(0, 256, (4, 3))
    mask = torch.cat([mask, torch.ones(4, 3, dtype=torch.long)], dim=1)
    out2 = model(nxt[:, :1], attention_mask=mask[:, :-2], cache=out.cache)
    out3 = model(nxt[:, 1:], attention_mask=mask, cache=out2.cache)
    for i, r in enumerate(rows):
        alone = model(torch.cat([r, nxt[i]])[None]).logits[0]  # [n + 3, V]
        torch.testing.assert_close(out.logits[i, T - len(r):], alone[:len(r)], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat([out2.logits[i], out3.logits[i]]), alone[len(r):], atol=1e-5, rtol=1e-5)
        assert not out.logits[i, :T - len(r)].any()  # logits at padded positions are 0


@torch.no_grad()
def test_generate_greedy_sampling_top_p_and_end_token():
    model = tiny("hope")
    prompts = [torch.randint(1, 256, (n,)) for n in (9, 4)]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 9 - len(p):], mask[i, 9 - len(p):] = p, 1
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    for i, p in enumerate(prompts):  # the padded batch gives each row what HopeLM.generate gives it alone
        alone = model.model.generate(p[None], 10, temperature=0)
        assert torch.equal(greedy[i, 9:], alone[0, len(p):])
    # top-p so small that only the most likely token survives: sampling becomes greedy
    nucleus = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_p=1e-6, top_k=0)
    assert torch.equal(nucleus, greedy)
    torch.manual_seed(1)
    a = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_p=0.9, temperature=1.5)
    torch.manual_seed(1)
    b = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_p=0.9, temperature=1.5)
    assert torch.equal(a, b) and not torch.equal(a, greedy)
    eos = int(greedy[1, 9 + 3])  # row 1's fourth new token ends its text
    stopped = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos)
    first = (greedy[1, 9:] == eos).nonzero()[0, 0]
    assert torch.equal(stopped[1, 9:9 + first + 1], greedy[1, 9:9 + first + 1])
    assert (stopped[1, 9 + first + 1:] == 0).all()  # then padding (pad_token_id 0)


def test_save_and_load_with_safetensors_and_the_tokenizer(tmp_path):
    model = tiny("hope")
    tokenizer = hf_tokenizer(ByteTokenizer())
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, HopeForCausalLM) and loaded.config.to_hope() == model.config.to_hope()
    assert loaded.model.head.weight is loaded.model.embed.weight  # still tied
    text = "héllo\n\x00wörld 日本"
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok(text)["input_ids"] == ByteTokenizer().encode(text) and tok.decode(tok(text)["input_ids"]) == text
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_labels_give_the_shifted_next_token_loss():
    model = tiny("transformer")
    ids = torch.randint(0, 256, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    logits = model(ids).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.model.embed.weight.grad is not None


@pytest.mark.parametrize(("call", "message"), [
    (lambda m, x: m(x, attention_mask=torch.full((2, 6), 2)), "only 0 (padding) and 1"),
    (lambda m, x: m(x, attention_mask=torch.ones(2, 3)), "attention_mask must be [B, S + T] = [2, >= 6]"),
    (lambda m, x: m(x, cache=m(x[:1]).cache), "cache holds 1 rows but input_ids has 2"),
    (lambda m, x: m(x, cache=(1, 2)), "cache must be a HopeCache"),
    (lambda m, x: m(x, past_key_values=(1, 2)), "unsupported arguments ['past_key_values']"),
    (lambda m, x: m(x, output_attentions=True), "unsupported arguments ['output_attentions']"),
    (lambda m, x: m(x, logits_to_keep=-1), "logits_to_keep must be an int >= 0 (0 keeps all), got -1"),
    (lambda m, x: m.generate(x, max_new_tokens=2, num_beams=2), "cannot use beam search"),  # transformers' message
    (lambda m, x: m(x[:, 0]), "input_ids must be a [B, T] tensor, got (2,)"),
    (lambda m, x: m(x[:, :2], attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), cache=m(x[:, :2]).cache),
     "must get the same number of real tokens per call, got [1, 2]"),
])
def test_bad_input_is_named(call, message):
    model = tiny("transformer")
    with pytest.raises(ValueError) as err:
        call(model, torch.randint(0, 256, (2, 6)))
    assert message in str(err.value)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="HopeConfig.core must be one of"):
        HopeHFConfig(core="lstm")
    with pytest.raises(ValueError, match="tie_word_embeddings=False contradicts tie_embeddings=True"):
        HopeHFConfig(tie_word_embeddings=False)


def test_cache_continues_an_imported_state():
    model = tiny("hope")
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        full = model(ids).logits
        saved = model.model.export_state(model.model(ids[:, :8]).state)
        cache = HopeCache.from_state(model.model.import_state(saved))
        torch.testing.assert_close(model(ids[:, 8:], cache=cache).logits, full[:, 8:], atol=1e-5, rtol=1e-5)


def test_a_train_checkpoint_converts_with_one_command(tmp_path, monkeypatch, capsys):
    from test_training import TINY, make_cfg

    from hope.training.inference import load_checkpoint
    from hope.training.run import run

    cfg = make_cfg(tmp_path, [*TINY, "model.size=tiny", "trainer.max_steps=1", "test=false",
                              "callbacks.model_checkpoint.every_n_train_steps=1"])
    run(cfg)
    capsys.readouterr()  # the run's final metrics table
    ckpt = tmp_path / "out" / "checkpoints" / "last.ckpt"  # make_cfg: the run folder is tmp_path/out
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out_dir = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "hope.hf.export", str(ckpt), str(out_dir)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    module, _ = load_checkpoint(ckpt)
    ids = torch.tensor([AutoTokenizer.from_pretrained(out_dir)("To be, or not")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, module.model(ids).logits, atol=0, rtol=0)
    proc = subprocess.run([sys.executable, "-m", "hope.hf.export", str(tmp_path / "missing.ckpt"), str(out_dir)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode != 0 and "missing.ckpt" in proc.stderr and "Traceback" not in proc.stderr
    if importlib.util.find_spec("lm_eval") is not None:  # evaluate.py --tasks takes the checkpoint itself too
        from hope.hf.harness import load_harness_model

        harness_model = load_harness_model(str(ckpt), max_length=77)
        assert harness_model.max_length == 77
        with torch.no_grad():
            torch.testing.assert_close(harness_model.model(ids).logits, module.model(ids).logits)
    import generate  # generate.py: --top-k 0 samples from every token (it raised a RuntimeError once)

    for top_k, expected in [("0", "To be"), ("-1", "--top-k must be >= 0 (0 = no top-k filter), got -1")]:
        monkeypatch.setattr(sys, "argv", ["generate.py", str(ckpt), "--prompt", "To be", "--tokens", "4",
                                          "--top-k", top_k])
        try:
            generate.main()
        except SystemExit as e:
            assert expected in str(e)
        else:
            assert capsys.readouterr().out.startswith(expected)


def test_hope_lm_generate_names_a_bad_top_k():
    model = tiny("transformer").model
    with pytest.raises(ValueError, match="top_k must be an int >= 1 or None"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, temperature=1.0, top_k=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_generate_with_padding_on_cuda():
    model = tiny("hope").cuda()
    prompts = [torch.randint(1, 256, (n,), device="cuda") for n in (9, 4)]
    ids = torch.zeros(2, 9, dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, 9 - len(p):], mask[i, 9 - len(p):] = p, 1
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    for i, p in enumerate(prompts):
        assert torch.equal(greedy[i, 9:], model.model.generate(p[None], 10, temperature=0)[0, len(p):])


def test_a_trained_bpe_tokenizer_keeps_its_ids(tmp_path):
    from hope.data.tokenizers import BPETokenizer

    bpe = BPETokenizer.train(["To be, or not to be, that is the question.\n\nWhether 'tis nobler"] * 20, 300, tmp_path)
    tok = hf_tokenizer(bpe)
    tok.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "To be or not, the question\nof nobler things"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"] == bpe.encode(text)
    assert loaded.decode(bpe.encode(text)) == text and len(loaded) == bpe.vocab_size
    assert loaded.pad_token_id == 0 and loaded.eos_token_id == (bpe.encode("\n")[0] if len(bpe.encode("\n")) == 1
                                                                 else None)
