"""The one loop: training, evaluation, checkpoints, device resolution, sweep summaries."""
