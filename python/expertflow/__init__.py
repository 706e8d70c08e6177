"""expertflow: run Mixture-of-Experts models larger than GPU memory.

Importing expertflow imports torch, loads the native extension and registers the
``torch.ops.expertflow`` operators. It never initialises CUDA and creates no stream.

Sub-packages, by concern: ``ops`` (native routing ops, their fake kernels and references),
``runtime`` (expert cache, offload, from_pretrained, prefetching), ``prediction`` (routing
predictors), ``traces`` (recorded routing, replay, statistics), ``serving`` (batched generation,
token scheduler), ``demo`` (the bundled model) and ``cli`` (the ``expertflow`` command).
"""

import torch  # noqa: F401  (loaded first: the extension links against libtorch)

from expertflow._extension import build_info, load_extension

_C = load_extension()

from expertflow import ops  # noqa: E402  (registers fake kernels for the ops _C defines)
from expertflow.runtime.cache import ExpertCache  # noqa: E402
from expertflow.runtime.memory import memory_report  # noqa: E402
from expertflow.runtime.offload import offload, restore  # noqa: E402
from expertflow.runtime.offloaded import OffloadedExperts  # noqa: E402
from expertflow.runtime.options import OffloadOptions  # noqa: E402
from expertflow.runtime.pretrained import from_pretrained  # noqa: E402
from expertflow.serving.generation import BatchGeneration, generate_batch  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BatchGeneration",
    "ExpertCache",
    "OffloadOptions",
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
