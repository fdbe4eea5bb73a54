"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales, 2018).

The embedding module (the backbone's feature maps, ``feature_kind = "map"``) maps each image to C x h x w;
each class's support maps are summed (the paper's K-shot class feature); the relation module scores every
(class, query) pair from the two maps concatenated on channels, [class sum, query], with a sigmoid; training
minimises the mean squared error of the scores against the one-hot labels.

The relation module's first convolution is linear in its input, so on a concatenation it splits:
conv([class; query], W) = conv(class, W_class) + conv(query, W_query) + b.  It runs on the N class maps and
the Q query maps of a task, not on its N x Q pairs, and the N x Q sums go on to batch norm (5-way 1-shot with
19 queries per class: 3.4 -> 0.36 GFLOP in that layer's forward).  ``RelationModule.score_pairs`` is the
definition on explicit pairs; the tests hold the two equal in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_runner.algorithms.base import MetaLearner, accuracy
from fewshot_runner.backbones.conv import ConvBlock, _fused_available
from fewshot_runner.episode import Episode
from fewshot_runner.errors import UserError


def class_sums(support_maps: torch.Tensor, support_y: torch.Tensor, n_way: int) -> torch.Tensor:
    """Each class's support maps summed: support_maps (T, S, C, h, w), support_y (T, S) -> (T, n_way, C, h, w)."""
    onehot = F.one_hot(support_y, n_way).to(support_maps.dtype)  # (T, S, n_way)
    sums = onehot.transpose(1, 2) @ support_maps.flatten(2)
    return sums.view(*sums.shape[:2], *support_maps.shape[2:])


def relation_pairs(class_maps: torch.Tensor, query_maps: torch.Tensor) -> torch.Tensor:
    """[class map, query map] concatenated on channels for every pair: class_maps (T, N, C, h, w), query_maps
    (T, Q, C, h, w) -> (T, Q, N, 2C, h, w); pair (q, n) holds class n's map in channels 0..C-1."""
    T, N = class_maps.shape[:2]
    Q = query_maps.shape[1]
    left = class_maps.unsqueeze(1).expand(T, Q, *class_maps.shape[1:])
    right = query_maps.unsqueeze(2).expand(T, Q, N, *query_maps.shape[2:])
    return torch.cat([left, right], dim=3)


def one_hot_mse(scores: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
    """mean over (T, Q, n_way) of (score - [y = k])^2: scores (T, Q, n_way), query_y (T, Q)."""
    return (scores - F.one_hot(query_y, scores.shape[-1]).to(scores.dtype)).pow(2).mean()


class RelationModule(nn.Module):
    """The paper's relation module: two blocks of conv3x3 (``channels``) - BatchNorm - ReLU - max-pool 2 on the
    2C-channel pair maps, then Linear -> ReLU -> Linear -> one relation logit per pair (the sigmoid is the
    learner's).  A block max-pools only while its map is at least 2 x 2, so backbones with small maps (Conv4's
    1 x 1 on 28 x 28) work too; on the paper's net (backbone=relation_conv4) both blocks pool.

    map_channels, map_size: the embedding maps' C and side (square maps).  ``forward(class_maps, query_maps)``
    scores every pair (the first convolution split by linearity); ``score_pairs`` explicit pairs (P, 2C, h, w).
    """

    def __init__(self, map_channels: int, map_size: int, channels: int = 64, hidden: int = 8,
                 fused_ops: str = "off") -> None:
        super().__init__()
        fused = _fused_available(fused_ops)
        side, blocks = map_size, []
        for c_in in (2 * map_channels, channels):
            pool = side >= 2
            blocks.append(ConvBlock(c_in, channels, pool=True, fused=fused, downsample=pool))
            side = side // 2 if pool else side
        self.blocks = nn.Sequential(*blocks)
        self.fc1 = nn.Linear(channels * side * side, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def score_pairs(self, pairs: torch.Tensor) -> torch.Tensor:
        """The definition: explicit pair maps (P, 2C, h, w) -> (P,) logits."""
        return self.head(self.blocks(pairs))

    def head(self, maps: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(maps.flatten(1)))).squeeze(1)

    def forward(self, class_maps: torch.Tensor, query_maps: torch.Tensor) -> torch.Tensor:
        """Every (query, class) pair's logit, [class map, query map] never concatenated: class_maps (T, N, C, h, w),
        query_maps (T, Q, C, h, w) -> (T, Q, N).  The first convolution runs on the class and query maps apart
        (split by linearity), their sums (T*Q*N, channels, h, w) go on through its BN + ReLU + pool."""
        T, N, C = class_maps.shape[:3]
        Q = query_maps.shape[1]
        first = self.blocks[0]
        conv = first.conv
        w = conv.weight
        cl, qu = class_maps.flatten(0, 1), query_maps.flatten(0, 1)
        w_class, w_query = w[:, :C], w[:, C:]
        if first.channels_last:  # NHWC maps and weights, as ConvBlock.forward (oneDNN's fast convolutions)
            cl, qu = cl.to(memory_format=torch.channels_last), qu.to(memory_format=torch.channels_last)
            w_class = w_class.to(memory_format=torch.channels_last)
            w_query = w_query.to(memory_format=torch.channels_last)
        a = F.conv2d(cl, w_class, None, conv.stride, conv.padding)  # (T*N, c, h', w')
        b = F.conv2d(qu, w_query, conv.bias, conv.stride, conv.padding)  # (T*Q, c, h', w')
        c, h, wd = a.shape[1:]
        # the pair sums in NHWC order: (T, Q, N, h', w', c), then seen as (P, c, h', w') (channels-last strides)
        a = a.permute(0, 2, 3, 1).reshape(T, 1, N, h, wd, c)
        b = b.permute(0, 2, 3, 1).reshape(T, Q, 1, h, wd, c)
        pre = (a + b).view(T * Q * N, h, wd, c).permute(0, 3, 1, 2)
        if not first.channels_last:
            pre = pre.contiguous()
        x = first.after_conv(pre)
        return self.head(self.blocks[1:](x)).view(T, Q, N)


class RelationNetworks(MetaLearner):
    """Support and query maps from one backbone pass (``forward_map``); every (class, query) pair scored by the
    relation module.  Works for any n_way.  ``predict`` returns the scores' logits (sigmoid^-1: the same order).

    The map's shape comes from ``feature_dim`` = C * side^2 and ``map_channels`` = C (the backbone's channels,
    64 for conv4 / relation_conv4).  Batch norm in training mode spans the batch (backbone) and every pair of
    the batch (relation module), so ``independent_tasks`` stays False; backbone and relation module can be
    ``torch.compile``d."""

    supports_compile = True
    feature_kind = "map"

    def __init__(self, backbone: nn.Module, n_way: int, feature_dim: int, map_channels: int = 64,
                 relation_channels: int = 64, relation_hidden: int = 8, fused_ops: str = "off") -> None:
        super().__init__()
        side = math.isqrt(feature_dim // map_channels) if map_channels > 0 else 0
        if map_channels < 1 or map_channels * side * side != feature_dim:
            raise UserError(f"algo.map_channels={map_channels} does not split the backbone's {feature_dim} features "
                            f"into square maps; set it to the backbone's channel count (backbone.hidden)")
        self.map_shape = (map_channels, side, side)
        self.backbone = backbone
        self.relation = RelationModule(map_channels, side, relation_channels, relation_hidden, fused_ops)
        self.compiled_map = None  # compile_for_speed: the compiled forward_map (a function: no state)

    def embed_maps(self, ep: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Support (T, S, C, h, w) and query (T, Q, C, h, w) maps from one backbone pass."""
        T, S, Q = ep.n_tasks, ep.support_x.shape[1], ep.query_x.shape[1]
        x = torch.cat([ep.support_x, ep.query_x], dim=1).flatten(0, 1)
        maps = (self.compiled_map or self.backbone.forward_map)(x)
        if tuple(maps.shape[1:]) != self.map_shape:
            raise UserError(f"the backbone's maps are {tuple(maps.shape[1:])}, not the {self.map_shape} the relation "
                            f"module was built for; set algo.map_channels to the backbone's channels (backbone.hidden)")
        maps = maps.view(T, S + Q, *self.map_shape)
        return maps[:, :S], maps[:, S:]

    def relation_logits(self, ep: Episode) -> torch.Tensor:
        """The relation logits (T, Q, n_way) of every (query, class) pair (sigmoid of them: the scores)."""
        support_maps, query_maps = self.embed_maps(ep)
        return self.relation(class_sums(support_maps, ep.support_y, ep.n_way), query_maps)

    def meta_loss(self, episodes: Episode):
        logits = self.relation_logits(episodes)
        loss = one_hot_mse(torch.sigmoid(logits), episodes.query_y)
        return loss, {"loss": loss.detach(), "acc": accuracy(logits.detach(), episodes.query_y)}

    def predict(self, episodes: Episode) -> torch.Tensor:
        return self.relation_logits(episodes)

    def embed_episode(self, episodes: Episode) -> dict[str, torch.Tensor]:
        """Flattened maps (D = C*h*w): support (T, S, D), query (T, Q, D), and each class's summed support map
        as its prototype (T, n_way, D): what the relation module compares."""
        support_maps, query_maps = self.embed_maps(episodes)
        sums = class_sums(support_maps, episodes.support_y, episodes.n_way)
        return {"support": support_maps.flatten(2), "query": query_maps.flatten(2), "prototypes": sums.flatten(2)}

    def compile_for_speed(self) -> None:
        """``device.compile=true``: ``torch.compile`` the backbone and the relation module in place (state-dict
        keys unchanged)."""
        self.compiled_map = torch.compile(self.backbone.forward_map)  # (Module.compile compiles forward only)
        self.relation.compile()
