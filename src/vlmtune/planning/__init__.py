"""Planning a run before it starts: memory per GPU, and named training shapes."""

from vlmtune.planning.memory import MemoryEstimate, ModelDims, dims_for, estimate_memory
from vlmtune.planning.shapes import GPU_MEMORY_GIB, TrainingShape, get_shape, list_shapes

__all__ = [
    "GPU_MEMORY_GIB",
    "MemoryEstimate",
    "ModelDims",
    "TrainingShape",
    "dims_for",
    "estimate_memory",
    "get_shape",
    "list_shapes",
]
