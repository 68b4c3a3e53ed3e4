"""`HopeHFConfig`: `hope.config.HopeConfig` as a `transformers` config (its fields flat in config.json)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from transformers import PretrainedConfig

from hope.config import HopeConfig

HOPE_FIELDS = tuple(f.name for f in fields(HopeConfig))


class HopeHFConfig(PretrainedConfig):
    """Every `HopeConfig` field as an attribute (validated by building the `HopeConfig`), plus the usual
    `transformers` ones (token ids, `tie_word_embeddings` = `tie_embeddings`). `to_hope()` gives the dataclass."""

    model_type = "hope"

    def __init__(self, **kwargs: Any) -> None:
        hope_kwargs = {name: kwargs.pop(name) for name in HOPE_FIELDS if name in kwargs}
        hope_cfg = HopeConfig(**hope_kwargs)
        for name, value in hope_cfg.to_dict().items():
            setattr(self, name, value)
        tie = kwargs.pop("tie_word_embeddings", hope_cfg.tie_embeddings)
        if tie != hope_cfg.tie_embeddings:
            raise ValueError(f"tie_word_embeddings={tie!r} contradicts tie_embeddings={hope_cfg.tie_embeddings!r}")
        super().__init__(tie_word_embeddings=tie, **kwargs)

    @classmethod
    def from_hope(cls, config: HopeConfig, **kwargs: Any) -> HopeHFConfig:
        """The `transformers` config of a `HopeConfig`; `kwargs` add `transformers` fields (e.g. `eos_token_id`)."""
        return cls(**config.to_dict(), **kwargs)

    def to_hope(self) -> HopeConfig:
        return HopeConfig(**{name: getattr(self, name) for name in HOPE_FIELDS})
