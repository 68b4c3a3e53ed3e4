from hope.models.lm import HopeBlock, HopeLM, LMOutput

__all__ = ["HopeBlock", "HopeLM", "LMOutput"]
