"""expertflow: run Mixture-of-Experts models larger than GPU memory.

Importing expertflow imports torch, loads the native extension and registers the
``torch.ops.expertflow`` operators. It never initialises CUDA and creates no stream.
"""

import torch  # noqa: F401  (loaded first: the extension links against libtorch)

from expertflow._extension import build_info, load_extension

_C = load_extension()

from expertflow import ops  # noqa: E402  (registers fake kernels for the ops _C defines)
from expertflow._offload import OffloadedExperts, memory_report, offload, restore  # noqa: E402
from expertflow._pretrained import from_pretrained  # noqa: E402
from expertflow.cache import ExpertCache  # noqa: E402
from expertflow.generation import BatchGeneration, generate_batch  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BatchGeneration",
    "ExpertCache",
    "OffloadedExperts",
    "__version__",
    "build_info",
    "from_pretrained",
    "generate_batch",
    "memory_report",
    "offload",
    "ops",
    "restore",
]
