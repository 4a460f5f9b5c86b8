"""DynaBERT: an encoder whose width and depth shrink at inference time, and its checkpoint format."""

from model.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from model.config import DynaBertConfig, TaskSpec
from model.modeling import DynaBertModel, DynaBertOutput

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DynaBertConfig",
    "DynaBertModel",
    "DynaBertOutput",
    "TaskSpec",
    "load_checkpoint",
    "save_checkpoint",
]
