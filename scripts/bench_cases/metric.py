"""Bench cases of the metric family (see bench_cases/__init__.py for what each function returns): Matching
Networks, Relation Networks, Siamese networks, Baseline and Baseline++, each against a plain reference written
as easyfsl or the paper's code writes it (nn.Conv2d / BatchNorm2d / ReLU / MaxPool2d modules, NCHW, fp32,
Adam), on the same weights and batch (bench_cases/metric_common.py).

The shapes (Omniglot 28x28, Conv4 of 64 channels):

* ``matchingnet_5w1s``: 5-way 1-shot, 15 queries per class, one episode per step (``algo=matchingnet``'s
  ``train.meta_batch_size``), without full context embeddings (the paper's Omniglot setting);
  ``matchingnet_fce_5w1s``: the same with ``algo.fce=true`` (5 read steps; the paper's miniImageNet setting).
* ``relationnet_5w1s_19q``: the paper's 5-way 1-shot training episode (19 queries per class, the paper setup
  conf/paper/relationnet_omniglot.yaml), one per step, ``backbone=relation_conv4`` (7x7 maps: the paper's code
  pads its first two convolutions with 0, 5x5; the package's relation_conv4 pads 1, and so does the reference).
* ``siamese_pairs128``: 128 same/different pairs per step from ``PairSampler`` (the learner's batch source;
  the paper's mini-batch), Conv4 embedding, no fully connected layer (``algo.embed_dim=null``).
* ``baseline_b16``, ``baselinepp_b16``: 16 class-labelled images per step from ``ClassBatchSampler`` (the
  authors' batch size) over the 4112 classes of the split (so the head is 4112 wide, as on Omniglot with
  rotations, and Baseline++'s scale the authors' 10).

Every case draws from Omniglot-sized random images (metric_common.py: why not the synthetic patterns).

Batch norm spans the whole batch in one backbone pass on both sides, as the package (the papers' codes embed
support and query, or the two images of a pair, in separate passes; with batch statistics that is another
objective).  Each case's n_way / n_shot / n_query are the episode shape (pair and class-batch cases: unused).
"""

from __future__ import annotations

import bench
from bench_cases import metric_common as common
from bench_cases.metric_common import Workload, backbone_spec, easyfsl_conv4, easyfsl_conv4_names

D = bench.HIDDEN  # Conv4's features on 28x28 images: 64 x 1 x 1
OMNIGLOT_TRAIN_CLASSES = common.OMNIGLOT_TRAIN_CLASSES  # the split's classes: the training head's width


# ----------------------------------------------------------------------------- Matching Networks
def matchingnet_spec(case) -> list:
    spec = backbone_spec()
    if "algo.fce=true" in case.overrides:
        b = D ** -0.5  # nn.LSTM / nn.LSTMCell's default init
        for suffix in ("", "_reverse"):
            spec += [(f"fce.support_lstm.weight_ih_l0{suffix}", (4 * D, D), -b, b),
                     (f"fce.support_lstm.weight_hh_l0{suffix}", (4 * D, D), -b, b),
                     (f"fce.support_lstm.bias_ih_l0{suffix}", (4 * D,), -b, b),
                     (f"fce.support_lstm.bias_hh_l0{suffix}", (4 * D,), -b, b)]
        spec += [("fce.query_cell.weight_ih", (4 * D, 2 * D), -b, b), ("fce.query_cell.weight_hh", (4 * D, D), -b, b),
                 ("fce.query_cell.bias_ih", (4 * D,), -b, b), ("fce.query_cell.bias_hh", (4 * D,), -b, b)]
    return spec


def matchingnet_reference(case):
    """Matching Networks as easyfsl's ``MatchingNetworks`` writes it, episode by episode: cosine attention over
    the support set, the attention-weighted one-hot labels, log, NLL.  With FCE: easyfsl's support
    bidirectional LSTM (g = h_fwd + h_bwd + g') and query attention LSTMCell (h_0 = f', c_0 = 0, input
    [f', read-out]), for ``fce_steps`` reads (easyfsl reads as many times as there are support images)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    fce = "algo.fce=true" in case.overrides
    steps = 5  # conf/algo/matchingnet.yaml's fce_steps

    class PlainMatchingNetworks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = easyfsl_conv4()
            self.package_names = easyfsl_conv4_names("backbone")
            if fce:
                self.support_lstm = nn.LSTM(D, D, num_layers=1, batch_first=True, bidirectional=True)
                self.query_cell = nn.LSTMCell(2 * D, D)
                for owner in ("support_lstm", "query_cell"):  # (the package's FCE names these two alike)
                    for name, _ in getattr(self, owner).named_parameters():
                        self.package_names[f"{owner}.{name}"] = f"fce.{owner}.{name}"

        def contextualize(self, zs, zq):
            out, _ = self.support_lstm(zs.unsqueeze(0))
            zs = out[0, :, :D] + out[0, :, D:] + zs
            hidden, cell = zq, torch.zeros_like(zq)
            for _ in range(steps):
                read_out = (hidden @ zs.T).softmax(-1) @ zs
                hidden, cell = self.query_cell(torch.cat([zq, read_out], 1), (hidden, cell))
                hidden = hidden + zq
            return zs, hidden

        def loss(self, ep):
            T, S = ep.support_x.shape[:2]
            z = self.backbone(torch.cat([ep.support_x, ep.query_x], 1).flatten(0, 1)).flatten(1).view(T, -1, D)
            losses = []
            for t in range(T):
                zs, zq = z[t, :S], z[t, S:]
                if fce:
                    zs, zq = self.contextualize(zs, zq)
                attention = F.cosine_similarity(zq.unsqueeze(1), zs.unsqueeze(0), dim=-1).softmax(-1)
                probs = attention @ F.one_hot(ep.support_y[t], ep.n_way).to(attention.dtype)
                losses.append(F.nll_loss(probs.log(), ep.query_y[t]))
            return torch.stack(losses).mean()

    return PlainMatchingNetworks()


def episode_source(case, split):
    from fewshot_runner.data.sampler import EpisodeSampler

    return EpisodeSampler(split, case.n_way, case.n_shot, case.n_query, seed=bench.SEED_EPISODES)


# ----------------------------------------------------------------------------- Relation Networks
def relationnet_spec(case) -> list:
    spec = backbone_spec()
    c_in = 2 * D
    for i in range(2):
        b = (c_in * 9) ** -0.5
        block = f"relation.blocks.{i}"
        spec += [(f"{block}.conv.weight", (D, c_in, 3, 3), -b, b), (f"{block}.conv.bias", (D,), -b, b),
                 (f"{block}.bn.weight", (D,), 1.0, 1.0), (f"{block}.bn.bias", (D,), 0.0, 0.0)]
        c_in = D
    b1, b2 = D ** -0.5, 8 ** -0.5
    return spec + [("relation.fc1.weight", (8, D), -b1, b1), ("relation.fc1.bias", (8,), -b1, b1),
                   ("relation.fc2.weight", (1, 8), -b2, b2), ("relation.fc2.bias", (1,), -b2, b2)]


def relationnet_reference(case):
    """Relation Networks as the paper's code (LearningToCompare_FSL, omniglot_train_one_shot.py) writes it: the
    CNNEncoder (4 conv blocks, max-pool in the first two), each class's support maps summed, every (query,
    class) pair [class map, query map] built by repeat + transpose + cat, the RelationNetwork (2 conv blocks
    with max-pool, fc 8, ReLU, fc 1, sigmoid), MSE against the one-hot labels."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class PlainRelationNetworks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = easyfsl_conv4(pool_blocks=2)
            self.layer1 = nn.Sequential(nn.Conv2d(2 * D, D, 3, padding=1), nn.BatchNorm2d(D), nn.ReLU(),
                                        nn.MaxPool2d(2))
            self.layer2 = nn.Sequential(nn.Conv2d(D, D, 3, padding=1), nn.BatchNorm2d(D), nn.ReLU(), nn.MaxPool2d(2))
            self.fc1, self.fc2 = nn.Linear(D, 8), nn.Linear(8, 1)
            self.package_names = easyfsl_conv4_names("encoder")
            for i in range(2):
                for own, pkg in (("0.weight", "conv.weight"), ("0.bias", "conv.bias"), ("1.weight", "bn.weight"),
                                 ("1.bias", "bn.bias")):
                    self.package_names[f"layer{i + 1}.{own}"] = f"relation.blocks.{i}.{pkg}"
            for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
                self.package_names[name] = f"relation.{name}"

        def loss(self, ep):
            T, S = ep.support_x.shape[:2]
            N, Q = ep.n_way, ep.query_x.shape[1]
            maps = self.encoder(torch.cat([ep.support_x, ep.query_x], 1).flatten(0, 1))
            maps = maps.view(T, -1, *maps.shape[1:])
            pairs = []
            for t in range(T):
                sample = torch.stack([maps[t, :S][ep.support_y[t] == c].sum(0) for c in range(N)])  # (N, C, h, w)
                sample_ext = sample.unsqueeze(0).repeat(Q, 1, 1, 1, 1)
                batch_ext = torch.transpose(maps[t, S:].unsqueeze(0).repeat(N, 1, 1, 1, 1), 0, 1)
                pairs.append(torch.cat((sample_ext, batch_ext), 2).view(-1, 2 * D, *maps.shape[-2:]))
            out = self.layer2(self.layer1(torch.cat(pairs)))
            relations = torch.sigmoid(self.fc2(F.relu(self.fc1(out.view(out.size(0), -1))))).view(T, Q, N)
            one_hot = torch.zeros(T, Q, N, dtype=relations.dtype, device=relations.device)
            return F.mse_loss(relations, one_hot.scatter_(2, ep.query_y.unsqueeze(2), 1))

    return PlainRelationNetworks()


# ----------------------------------------------------------------------------- Siamese networks
def siamese_spec(case) -> list:
    return backbone_spec() + [("alpha", (D,), -D ** -0.5, D ** -0.5), ("bias", (), -0.1, 0.1)]


def siamese_reference(case):
    """Koch et al.'s siamese net as usually written: the twin embedding, ``nn.Linear(D, 1)`` on |h1 - h2| (the
    weighted L1 distance and its bias), BCE with logits; both images of every pair in one pass."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class PlainSiamese(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = easyfsl_conv4()
            self.fc = nn.Linear(D, 1)
            self.package_names = {**easyfsl_conv4_names("backbone"), "fc.weight": "alpha", "fc.bias": "bias"}

        def loss(self, batch):
            h = self.backbone(torch.cat([batch.x1, batch.x2])).flatten(1)
            h1, h2 = h[: len(batch.x1)], h[len(batch.x1):]
            return F.binary_cross_entropy_with_logits(self.fc(torch.abs(h1 - h2)).squeeze(1), batch.same)

    return PlainSiamese()


def pair_source(case, split):
    from fewshot_runner.data.batches import PairSampler

    return PairSampler(split, seed=bench.SEED_EPISODES)


# ----------------------------------------------------------------------------- Baseline, Baseline++
def baseline_spec(case) -> list:
    C, b = OMNIGLOT_TRAIN_CLASSES, D ** -0.5
    if case.workload == "baselinepp":
        return backbone_spec() + [("head.v", (C, D), -b, b), ("head.g", (C,), 0.5, 1.5)]
    return backbone_spec() + [("head.w", (C, D), -b, b), ("head.b", (C,), -b, b)]


def baseline_reference(case):
    """Chen et al.'s code (CloserLookFewShot, ``BaselineTrain``): ``feature`` (Conv4) then ``classifier``:
    ``nn.Linear`` (Baseline) or ``distLinear`` (Baseline++: a bias-free linear map under weight norm, dim 0,
    on x / (||x|| + 1e-5), times the scale: 2 up to 200 classes, else 10); cross-entropy."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.nn.utils.parametrizations import weight_norm

    cosine = case.workload == "baselinepp"

    class DistLinear(nn.Module):
        def __init__(self, indim: int, outdim: int) -> None:
            super().__init__()
            self.L = weight_norm(nn.Linear(indim, outdim, bias=False), name="weight", dim=0)
            self.scale_factor = 2 if outdim <= 200 else 10

        def forward(self, x):
            x_norm = torch.norm(x, p=2, dim=1).unsqueeze(1).expand_as(x)
            return self.scale_factor * self.L(x.div(x_norm + 0.00001))

    class PlainBaselineTrain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.feature = easyfsl_conv4()
            C = OMNIGLOT_TRAIN_CLASSES
            self.classifier = DistLinear(D, C) if cosine else nn.Linear(D, C)
            head = ({"classifier.L.parametrizations.weight.original0": "head.g",
                     "classifier.L.parametrizations.weight.original1": "head.v"} if cosine
                    else {"classifier.weight": "head.w", "classifier.bias": "head.b"})
            self.package_names = {**easyfsl_conv4_names("feature"), **head}

        def loss(self, batch):
            return F.cross_entropy(self.classifier(self.feature(batch.x).flatten(1)), batch.y)

    return PlainBaselineTrain()


def class_batch_source(case, split):
    from fewshot_runner.data.batches import ClassBatchSampler

    return ClassBatchSampler(split, seed=bench.SEED_EPISODES)


# ----------------------------------------------------------------------------- the cases
_FAST = "package {} via compose_learner + its batch_source + gradient_outer_step (fused ops, channels-last as resolved)"
WORKLOADS: dict[str, Workload] = {
    "matchingnet": Workload("matchingnet", "conv4", matchingnet_spec, episode_source, matchingnet_reference,
                            _FAST.format("matchingnet"), "easyfsl-style MatchingNetworks (nn.Module Conv4, per-episode "
                            "cosine attention; FCE: nn.LSTM + nn.LSTMCell), fp32, Adam"),
    "relationnet": Workload("relationnet", "relation_conv4", relationnet_spec, episode_source, relationnet_reference,
                            _FAST.format("relationnet"), "the paper's code's CNNEncoder + RelationNetwork (nn.Module, "
                            "repeat/cat pairs), fp32, Adam"),
    "siamese": Workload("siamese", "conv4", siamese_spec, pair_source, siamese_reference, _FAST.format("siamese"),
                        "plain siamese nn.Module (Conv4 twin, nn.Linear on |h1-h2|, BCE), fp32, Adam"),
    "baseline": Workload("baseline", "conv4", baseline_spec, class_batch_source, baseline_reference,
                         _FAST.format("baseline"), "Chen et al.'s BaselineTrain (nn.Module Conv4 + nn.Linear), fp32, "
                         "Adam" ),
    "baselinepp": Workload("baselinepp", "conv4", baseline_spec, class_batch_source, baseline_reference,
                           _FAST.format("baselinepp"), "Chen et al.'s BaselineTrain (nn.Module Conv4 + distLinear "
                           "under weight_norm), fp32, Adam" ),
}

CASES: list = [
    bench.Case("matchingnet_5w1s", "matchingnet", 5, 1, 15, 1, 1, quick=(2, 10), full=(3, 20), algo="matchingnet"),
    bench.Case("matchingnet_fce_5w1s", "matchingnet", 5, 1, 15, 1, 1, quick=(2, 10), full=(3, 20),
               algo="matchingnet", overrides=("algo.fce=true",)),
    bench.Case("relationnet_5w1s_19q", "relationnet", 5, 1, 19, 1, 1, quick=(2, 8), full=(2, 12), algo="relationnet"),
    bench.Case("siamese_pairs128", "siamese", 5, 1, 15, 128, 8, quick=(2, 8), full=(2, 15), algo="siamese"),
    bench.Case("baseline_b16", "baseline", 5, 1, 15, 16, 4, quick=(3, 20), full=(5, 40), algo="baseline"),
    bench.Case("baselinepp_b16", "baselinepp", 5, 1, 15, 16, 4, quick=(3, 20), full=(5, 40), algo="baselinepp"),
]


reference_step, fast_step, check, describe = common.plugin_functions(WORKLOADS)
