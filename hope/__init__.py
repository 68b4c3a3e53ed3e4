"""hope: Nested Learning and the HOPE architecture in PyTorch.

    from hope import HopeConfig, HopeLM, preset
    model = HopeLM(preset("hope", "small"))
    out = model(input_ids)            # out.logits [B, T, V], out.state (carry it to continue the streams)
"""

from hope.config import CMSLevel, HopeConfig, preset
from hope.models.lm import HopeLM, LMOutput

__version__ = "0.1.0"
__all__ = ["CMSLevel", "HopeConfig", "HopeLM", "LMOutput", "preset"]
