"""Feature extractors. Each maps (N, *x_shape) -> (N, feature_dim) and is a plain nn.Module,
so gradient-based meta-learners can run it with ``torch.func.functional_call``."""
