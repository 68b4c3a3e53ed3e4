"""`hf_tokenizer`: a hope tokenizer (`hope.data.tokenizers`) as a `transformers` fast tokenizer, so that it saves
with `save_pretrained` and loads with `AutoTokenizer`.

- "bytes": a byte-level vocabulary of 256 tokens whose ids are the byte values (no merges), exactly `ByteTokenizer`.
- "bpe": the trained `tokenizers` file, as is.
- "hf:<name>": the Hugging Face tokenizer itself.

The byte and BPE vocabularies have no special tokens, and their 256 (or trained) ids are all text. They declare
byte 0 (NUL) as padding, which never reaches the model (hope.hf.cache), and "\\n" as end of text when it is one
token: training joined documents with a blank line, and lm-evaluation-harness needs an end-of-text id as the prefix
of a context-free log-likelihood. No BOS token is added.
"""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from hope.data.tokenizers import BPETokenizer, ByteTokenizer, HFTokenizer, Tokenizer, _byte_to_unicode


def hf_tokenizer(tokenizer: Tokenizer, model_max_length: int | None = None) -> PreTrainedTokenizerBase:
    """The `transformers` tokenizer that encodes text to the same ids as `tokenizer`."""
    if isinstance(tokenizer, HFTokenizer):
        return AutoTokenizer.from_pretrained(tokenizer.name.removeprefix("hf:"))
    if isinstance(tokenizer, ByteTokenizer):
        backend = _byte_backend()
    elif isinstance(tokenizer, BPETokenizer):
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_file(str(tokenizer.path))
    else:
        raise ValueError(f"no Hugging Face form for tokenizer {type(tokenizer).__name__} {tokenizer.name!r}; "
                         "accepted: bytes, bpe, hf:<name>")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                  model_max_length=model_max_length or int(1e30))
    tok.pad_token = backend.id_to_token(0)
    newline = tokenizer.encode("\n")
    if len(newline) == 1:
        tok.eos_token = backend.id_to_token(newline[0])
    return tok


def _byte_backend():
    """A `tokenizers` byte-level BPE without merges: token id = byte value."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    backend = Backend(models.BPE(vocab=_byte_to_unicode(), merges=[]))  # {printable char: byte}
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return backend
