"""Fused ops for the memory-bound parts of second-order MAML on CPU (see bn_relu_pool.py, stem.py), and
a convolution whose double backward runs grouped convolutions whole (conv.py, MAML's grouped path)."""

from fewshot_runner.ops.bn_relu_pool import (bn_relu_pool, bn_relu_pool_reference, extension_status, load_extension,
                                             update_running_stats)
from fewshot_runner.ops.stem import conv_bn_relu_pool, conv_bn_relu_pool_reference

__all__ = ["bn_relu_pool", "bn_relu_pool_reference", "conv_bn_relu_pool", "conv_bn_relu_pool_reference",
           "extension_status", "load_extension", "update_running_stats"]
