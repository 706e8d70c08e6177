"""Prints what CMake needs to know about the installed torch, one `key=value` per line.

Run by cmake/ExpertflowTorch.cmake. Importing torch does not initialise CUDA.
"""

import torch
from torch.utils import cpp_extension

print(f"version={torch.__version__}")
print(f"cuda={torch.version.cuda or ''}")
print(f"cxx11_abi={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
print("include_dirs=" + ";".join(cpp_extension.include_paths()))
print("library_dirs=" + ";".join(cpp_extension.library_paths()))
