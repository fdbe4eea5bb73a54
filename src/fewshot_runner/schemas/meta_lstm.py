"""Schema of ``algo=meta_lstm``: Ravi & Larochelle's LSTM meta-learner (algorithms/meta_lstm.py)."""

from __future__ import annotations

from dataclasses import dataclass

from fewshot_runner.schemas import register


@register("algo", "meta_lstm")
@dataclass
class MetaLSTMConfig:
    _target_: str = "fewshot_runner.algorithms.meta_lstm.LSTMMetaLearner"
    inner_steps: int = 12  # learner updates per training task, each on the whole support set (paper, 1-shot: 12)
    eval_inner_steps: int = 12  # learner updates at validation and test
    hidden_size: int = 20  # units of the first (plain) LSTM layer, per learner coordinate (paper: 20)
    preprocess_p: float = 10.0  # p of the log-magnitude / sign preprocessing of loss and gradient (paper: 10)
    bn_momentum: float = 0.9  # momentum of the per-episode running averages of the learner's batch norm
    # test-time batch norm of the queries: running (averages collected on the episode's support set during
    # its updates, the paper's choice) or batch (the queries' own statistics, transductive)
    eval_bn: str = "running"
