"""Fused ops for the memory-bound parts of second-order MAML on CPU (see bn_relu_pool.py)."""

from fewshot_runner.ops.bn_relu_pool import (bn_relu_pool, bn_relu_pool_reference, extension_status, load_extension,
                                             update_running_stats)

__all__ = ["bn_relu_pool", "bn_relu_pool_reference", "extension_status", "load_extension", "update_running_stats"]
