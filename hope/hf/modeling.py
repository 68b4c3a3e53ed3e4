"""`HopeForCausalLM`: `hope.models.HopeLM` as a `transformers` `PreTrainedModel` with `GenerationMixin`.

Legend: B batch, T new tokens, S columns seen before this call, V vocabulary.

```
input_ids [B, T], attention_mask [B, S + T] or [B, T]
     │  HopeCache: one StreamState per group of rows with equal numbers of real tokens (hope.hf.cache)
     ▼
for each group:  the group's real tokens [b, n] ─► HopeLM(ids, state) ─► logits [b, n, V], new state
     ▼
logits [B, T, V]   (0 at padded positions) , cache (the updated states; `generate` passes it back)
```
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from hope.hf.cache import HopeCache
from hope.hf.configuration import HopeHFConfig
from hope.models import HopeLM

if "cache" not in CausalLMOutputWithPast.__dataclass_fields__:
    import transformers

    raise ImportError(f"hope.hf needs transformers >= 5.0 (its `cache` argument and output field); found "
                      f"{transformers.__version__}: pip install 'transformers>=5,<6'")


class HopeForCausalLM(PreTrainedModel, GenerationMixin):
    """`model(input_ids, attention_mask=None, cache=None, labels=None) -> CausalLMOutputWithPast(loss, logits,
    cache)`; `generate` (greedy, sampling, top-k, top-p, end tokens, left-padded batches) carries the `HopeCache`.

    Feeding a stream in pieces with the returned `cache` gives the logits of one call over the whole stream.
    Padded tokens (attention mask 0) never reach the model: each row reads only its real tokens, so a padded
    batch gives each row what it would get alone; logits at padded positions are 0.
    """

    config_class = HopeHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["HopeBlock"]

    def __init__(self, config: HopeHFConfig) -> None:
        super().__init__(config)
        self.model = HopeLM(config.to_hope())
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"model.head.weight": "model.embed.weight"}
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: `HopeLM` initialises every parameter when it is built (`HopeLM.init_weights`)."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is HopeCache, made by the first forward

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.head

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.model.head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: HopeCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        # position_ids are not needed: each row's position is in its state. Requests for attention weights or
        # per-layer hidden states are refused, as is an unknown argument.
        unknown = {k: v for k, v in kwargs.items() if v is not None and v is not False and k != "position_ids"}
        if unknown:
            raise ValueError(f"HopeForCausalLM.forward got unsupported arguments {sorted(unknown)}; it takes "
                             "input_ids, attention_mask, cache, labels, use_cache, logits_to_keep")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [B, T] tensor, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else input_ids!r}")
        B, T = input_ids.shape
        mask = _new_columns_mask(attention_mask, B, T, input_ids.device)  # [B, T] bool
        if cache is None:
            cache = HopeCache.for_mask(mask)
        elif not isinstance(cache, HopeCache):
            raise ValueError(f"cache must be a HopeCache (returned by a previous call), got {type(cache).__name__}")
        elif cache.batch_size != B:
            raise ValueError(f"cache holds {cache.batch_size} rows but input_ids has {B}")
        logits = self._run_groups(input_ids, mask, cache)  # [B, T, V]
        cache.seen += T
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0 keeps all), got {logits_to_keep!r}")
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]  # [B, k, V]: what `generate` reads
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache is not False else None)
        return out.to_tuple() if return_dict is False else out

    def _run_groups(self, input_ids: torch.Tensor, mask: torch.Tensor, cache: HopeCache) -> torch.Tensor:
        """Each group's real tokens through `HopeLM` with the group's state; logits `[B, T, V]`, 0 at padding."""
        B, T = input_ids.shape
        if len(cache.groups) == 1 and bool(mask.all()):  # no padding: the whole batch in one call
            group = cache.groups[0]
            out = self.model(input_ids, group.state)  # the one group holds every row, in order
            group.state = out.state
            return out.logits
        logits = None
        for group in cache.groups:
            keep = mask[group.rows]  # [b, T]
            counts = keep.sum(dim=1)
            if bool((counts != counts[0]).any()):
                raise ValueError(f"rows {group.rows.tolist()} share one stream state and must get the same number "
                                 f"of real tokens per call, got {counts.tolist()} (attention_mask of the new tokens)")
            n = int(counts[0]) if counts.numel() else 0
            if n == 0:
                continue
            out = self.model(input_ids[group.rows][keep].view(-1, n), group.state)  # logits [b, n, V]
            group.state = out.state
            if logits is None:
                logits = out.logits.new_zeros(B, T, out.logits.shape[-1])
            rows = group.rows[:, None].expand(-1, T)[keep]  # [b·n] (row, column) of every real token
            cols = torch.arange(T, device=keep.device).expand(len(group.rows), -1)[keep]
            logits[rows, cols] = out.logits.flatten(0, 1)
        if logits is None:  # nothing but padding: no call was made
            logits = torch.zeros(B, T, self.config.vocab_size, device=input_ids.device, dtype=self.dtype)
        return logits


def _new_columns_mask(attention_mask: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor:
    """The mask of the T new columns `[B, T]` (bool) from a mask over them, or over all columns seen (`generate`)."""
    if attention_mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
        raise ValueError(f"attention_mask must be [B, S + T] = [{B}, >= {T}] with 1 for real tokens and 0 for "
                         f"padding, got shape {tuple(attention_mask.shape)}")
    new = attention_mask[:, -T:] if T else attention_mask[:, :0]
    if bool(((new != 0) & (new != 1)).any()):
        raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (real token), got values "
                         f"{torch.unique(new).tolist()}")
    return new.bool()
