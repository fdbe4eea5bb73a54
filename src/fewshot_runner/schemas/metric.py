"""Schemas of the metric learners that compare embeddings by attention or a learned relation (``algo=NAME``):
Matching Networks and Relation Networks (ProtoNet's schema is in ``schemas/algorithms.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from fewshot_runner.schemas import register


@register("algo", "matchingnet")
@dataclass
class MatchingNetConfig:
    _target_: str = "fewshot_runner.algorithms.matchingnet.MatchingNetworks"
    # full context embeddings: a bidirectional LSTM over the support set, an attention LSTM for each query
    # (the paper's miniImageNet setting; its Omniglot results are without)
    fce: bool = False
    fce_steps: int = 5  # K: the attention LSTM's read steps over the support set (fce=true)
    # s in softmax(s * cos): 1 is the paper's (plain cosines, a soft attention); larger sharpens it (temperature 1/s)
    scale: float = 1.0


@register("algo", "relationnet")
@dataclass
class RelationNetConfig:
    _target_: str = "fewshot_runner.algorithms.relationnet.RelationNetworks"
    map_channels: int = 64  # channels of the backbone's feature maps (its backbone.hidden)
    relation_channels: int = 64  # channels of the relation module's two conv blocks
    relation_hidden: int = 8  # width of the relation module's hidden fully connected layer
    fused_ops: str = "${device.fused_ops}"  # off | on | auto: the relation module's fused BN + ReLU + max-pool
