"""DynaBERT: an encoder whose width and depth shrink at inference time, and its checkpoint format.

The names below load on first use (PEP 562), so that ``import model.cli`` does not import torch:
`dynabert serve` re-executes itself with OpenMP settings before torch loads (service/cli.py), and
an eager import here cost every start an extra torch import (about 2.5 s on two cores)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
    from model.config import DynaBertConfig, TaskSpec
    from model.modeling import DynaBertModel, DynaBertOutput

_WHERE = {
    "Checkpoint": "model.checkpoint",
    "CheckpointError": "model.checkpoint",
    "load_checkpoint": "model.checkpoint",
    "save_checkpoint": "model.checkpoint",
    "DynaBertConfig": "model.config",
    "TaskSpec": "model.config",
    "DynaBertModel": "model.modeling",
    "DynaBertOutput": "model.modeling",
}
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


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
