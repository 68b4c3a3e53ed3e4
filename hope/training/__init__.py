from hope.training.module import LMModule, NonFiniteLossError

__all__ = ["LMModule", "NonFiniteLossError"]
