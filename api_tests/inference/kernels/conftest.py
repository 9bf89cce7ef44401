"""Without a GPU the kernels run in Triton's CPU interpreter. It must be chosen before triton
decorates the kernels, i.e. before anything imports service.inference.kernels."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
