"""In-process GraniteMoeHybrid runtime with explicit, restorable state (batch size 1).

See ``model.HybridModel`` for the forward contract and ``state`` for KV caches and snapshots.
"""

from .config import HybridConfig
from .model import HybridModel, Interrupted
from .state import KVCache, KVHold, MambaSnapshot, ModelState

__all__ = ["HybridConfig", "HybridModel", "Interrupted", "KVCache", "KVHold", "MambaSnapshot", "ModelState"]
