"""Hugging Face `transformers` integration: `HopeHFConfig`, `HopeForCausalLM`, the stream-state cache and tokenizers.

    import hope.hf  # registers model type "hope" with AutoConfig and AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out/hope_small_hf")
    out = model.generate(**tok(["ROMEO:"], return_tensors="pt"), max_new_tokens=50, do_sample=True, top_p=0.9)

`transformers` is an optional extra (`pip install -e ".[hf]"`): nothing outside this package imports it at module
level. docs/huggingface.md describes the cache, padding, conversion of train.py checkpoints and lm-evaluation-harness.
"""

from __future__ import annotations

try:
    import transformers
except ImportError as err:
    raise ImportError(f"hope.hf needs `transformers`; install the extra: pip install -e '.[hf]' ({err})") from err

from hope.hf.cache import HopeCache
from hope.hf.configuration import HopeHFConfig
from hope.hf.modeling import HopeForCausalLM
from hope.hf.tokenizer import hf_tokenizer

transformers.AutoConfig.register(HopeHFConfig.model_type, HopeHFConfig, exist_ok=True)
transformers.AutoModelForCausalLM.register(HopeHFConfig, HopeForCausalLM, exist_ok=True)

__all__ = ["HopeCache", "HopeForCausalLM", "HopeHFConfig", "hf_tokenizer"]
