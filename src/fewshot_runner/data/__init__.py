"""Episodic data sets (Omniglot, synthetic, ...) held in memory as ClassSplits, and the episode sampler."""
