"""Meta-learners.  Each is an ``nn.Module`` built as
``Algo(backbone=..., n_way=..., feature_dim=..., **hyper_parameters)`` by Hydra ``_target_``
and exposes the small interface in :mod:`fewshot_runner.algorithms.base`."""
