"""OmniMoE: shared dense SwiGLU MLP + millions of atomic experts routed by product keys."""
from .config import OmniMoEConfig
from .errors import OmniMoEInputError
from .layer import OmniMoELayer

__all__ = ["OmniMoEConfig", "OmniMoELayer", "OmniMoEInputError"]
__version__ = "0.1.0"
