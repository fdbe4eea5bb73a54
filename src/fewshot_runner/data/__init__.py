"""Episodic data sets and their samplers.

Data sets: ``synthetic`` (generated), ``omniglot`` (files, decoded once and cached); each returns an
``base.EpisodicDataset`` of ``base.ClassSplit``s. Shared by all data sets: ``root`` (where the data
is), ``archive`` (zip members read in place), ``decode`` (parallel decoding), ``cache`` (the
decoded-tensor cache), ``class_splits`` (split files, rotations as new classes), ``store`` (images
read lazily from disk). Batch sources: ``sampler.EpisodeSampler``, ``batches.ClassBatchSampler`` /
``PairSampler``, and ``loader.PrefetchingLoader`` to gather in DataLoader workers. ``transforms``:
normalisation and augmentation on the device. ``docs/adding_a_dataset.md`` walks through them.
"""
