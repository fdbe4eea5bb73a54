"""Siamese networks: the weighted L1 + sigmoid head and the pair loss against a hand computation (float64),
K-shot class scores (max / mean), one-shot prediction by the most similar support image, Koch's affine
distortions (exact warps, training only, torch's global generator), and the CLI (smoke, eval, kill + resume)."""

import json
import math

import pytest
import torch
from test_faults import records
from torch import nn

from conftest import RESUMABLE_STEPS, kill_and_resume, smoke_eval, smoke_train
from fewshot_runner.algorithms.siamese import SiameseNetwork, class_scores
from fewshot_runner.data.transforms import RandomAffine, affine_warp, build_transforms
from fewshot_runner.episode import Episode, PairBatch

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)
D = 4


def make_siamese(**kw):
    torch.manual_seed(0)
    return SiameseNetwork(nn.Flatten(), n_way=3, feature_dim=D, **kw).double()


def test_siamese_pair_logits_and_loss_equal_a_hand_computation():
    """p = sigmoid(sum_j alpha_j |h1_j - h2_j| + b), loss = mean binary cross-entropy of p against same."""
    net = make_siamese()
    with torch.no_grad():
        net.alpha.copy_(torch.tensor([0.5, -1.0, 2.0, -0.25]))
        net.bias.fill_(0.3)
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(5, D, generator=g, dtype=torch.float64) for _ in range(2))
    same = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    loss, metrics = net.meta_loss(PairBatch(x1, x2, same))
    alpha, hand_loss, right = [0.5, -1.0, 2.0, -0.25], 0.0, 0
    for i in range(5):
        s = sum(alpha[j] * abs(x1[i, j].item() - x2[i, j].item()) for j in range(D)) + 0.3
        p = 1 / (1 + math.exp(-s))
        assert net.pair_logits(x1[i:i + 1], x2[i:i + 1]).item() == pytest.approx(s, rel=1e-13)
        y = same[i].item()
        hand_loss -= (y * math.log(p) + (1 - y) * math.log(1 - p)) / 5
        right += (p > 0.5) == (y == 1.0)
    assert loss.item() == pytest.approx(hand_loss, rel=1e-12)
    assert metrics["acc"].item() == pytest.approx(right / 5)


def test_all_pairs_loss_equals_a_hand_computation_over_every_pair_of_each_batch():
    """pairs=all: two class-grouped batches of 4 images; every unordered pair i < j within a batch is scored,
    and the loss is half the mean cross-entropy of the same-class pairs plus half that of the others."""
    net = make_siamese(pairs="all")
    with torch.no_grad():
        net.alpha.copy_(torch.tensor([0.5, -1.0, 2.0, -0.25]))
        net.bias.fill_(0.3)
    g = torch.Generator().manual_seed(2)
    sx, qx = torch.randn(2, 2, D, generator=g, dtype=torch.float64), torch.randn(2, 2, D, generator=g, dtype=torch.float64)
    sy, qy = torch.tensor([[0, 1], [1, 0]]), torch.tensor([[0, 1], [0, 0]])
    loss, metrics = net.meta_loss(Episode(sx, sy, qx, qy, n_way=2))
    alpha, pos, neg, right = [0.5, -1.0, 2.0, -0.25], [], [], 0
    for t in range(2):
        x, y = torch.cat([sx[t], qx[t]]), torch.cat([sy[t], qy[t]])
        for i in range(4):
            for j in range(i + 1, 4):
                s = sum(alpha[d] * abs(x[i, d].item() - x[j, d].item()) for d in range(D)) + 0.3
                p = 1 / (1 + math.exp(-s))
                same = y[i].item() == y[j].item()
                (pos if same else neg).append(-math.log(p) if same else -math.log(1 - p))
                right += (p > 0.5) == same
    assert (len(pos), len(neg)) == (2 + 3, 4 + 3)  # batch 0: classes 0,1,0,1; batch 1: 1,0,0,0
    hand = 0.5 * sum(pos) / len(pos) + 0.5 * sum(neg) / len(neg)
    assert loss.item() == pytest.approx(hand, rel=1e-12)
    assert metrics["acc"].item() == pytest.approx(right / 12)


def test_all_pairs_training_draws_class_grouped_episodes_and_sampled_pairs_draw_pairs():
    from fewshot_runner.data.base import ClassSplit
    from fewshot_runner.data.batches import PairSampler
    from fewshot_runner.data.sampler import EpisodeSampler

    split = ClassSplit.from_class_major("train", torch.zeros(6, 5, 1, 2, 2, dtype=torch.uint8), list("abcdef"))
    source = make_siamese(pairs="all").batch_source(split, n_way=3, n_shot=1, n_query=2, seed=0)
    assert isinstance(source.sampler, EpisodeSampler)
    # train.meta_batch_size pairs' images (2 each) in whole 9-image episodes, at least one
    assert [source.episodes(n) for n in (1, 4, 5, 9, 64)] == [1, 1, 1, 2, 14]
    assert source.sample(9).query_x.shape == (2, 6, 1, 2, 2)
    state = source.state_dict()
    again = source.sample(9)
    source.load_state_dict(state)
    assert torch.equal(source.sample(9).support_y, again.support_y)
    assert isinstance(make_siamese().batch_source(split, n_way=3, n_shot=1, n_query=2, seed=0), PairSampler)


def test_siamese_embed_dim_adds_koch_fully_connected_sigmoid_layer():
    net = make_siamese(embed_dim=3)
    x = torch.randn(2, D, dtype=torch.float64)
    lin = net.embed[0]
    torch.testing.assert_close(net.features(x), torch.sigmoid(x @ lin.weight.T + lin.bias), rtol=1e-14, atol=0)
    assert net.alpha.shape == (3,)


def test_k_shot_class_scores_take_the_max_or_the_mean_probability_of_each_class():
    """Class 0 has one very similar and one dissimilar support image; class 1 two fairly similar ones:
    max prefers class 0, mean (of the probabilities) class 1."""
    pair = torch.tensor([[[4.0, -6.0, 1.0, 1.0]]], dtype=torch.float64)  # (T=1, Q=1, S=4)
    support_y = torch.tensor([[0, 0, 1, 1]])
    mx = class_scores(pair, support_y, 2, "max")
    mean = class_scores(pair, support_y, 2, "mean")
    assert mx[0, 0].tolist() == [4.0, 1.0]
    sig = torch.sigmoid(pair[0, 0])
    for c, (a, b) in enumerate([(0, 1), (2, 3)]):
        p = (sig[a] + sig[b]).item() / 2
        assert mean[0, 0, c].item() == pytest.approx(math.log(p / (1 - p)), rel=1e-12)
    assert mx.argmax(-1).item() == 0 and mean.argmax(-1).item() == 1
    # saturated probabilities (1.0 in float64) keep their order in log space
    far = class_scores(torch.tensor([[[60.0, 50.0]]], dtype=torch.float64), torch.tensor([[0, 1]]), 2, "mean")
    assert far[0, 0, 0] > far[0, 0, 1] and torch.isfinite(far).all()


def test_one_shot_prediction_picks_the_most_similar_support_image():
    """Support images in a shuffled class order; each query is a support image plus small noise: the predicted
    class is that image's class (alpha < 0: a smaller weighted distance is more similar)."""
    net = make_siamese()
    with torch.no_grad():
        net.alpha.copy_(-torch.tensor([1.0, 2.0, 0.5, 1.5]))
    g = torch.Generator().manual_seed(2)
    n_way = 5
    support = torch.randn(2, n_way, D, generator=g, dtype=torch.float64) * 3
    support_y = torch.stack([torch.randperm(n_way, generator=g) for _ in range(2)])
    pick = torch.stack([torch.randperm(n_way, generator=g) for _ in range(2)])  # which support image each query copies
    query = torch.gather(support, 1, pick.unsqueeze(-1).expand(-1, -1, D))
    query = query + 0.01 * torch.randn(query.shape, generator=g, dtype=torch.float64)
    query_y = torch.gather(support_y, 1, pick)
    logits = net.predict(Episode(support, support_y, query, query_y, n_way))
    assert logits.shape == (2, n_way, n_way)
    assert torch.equal(logits.argmax(-1), query_y)
    # the same with a hand-picked nearest image by the weighted L1 distance
    w = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    dist = ((query.unsqueeze(2) - support.unsqueeze(1)).abs() * w).sum(-1)
    assert torch.equal(torch.gather(support_y, 1, dist.argmin(-1)), query_y)


def test_siamese_refuses_an_unknown_shot_score():
    from fewshot_runner.errors import UserError

    with pytest.raises(UserError, match="algo.shot_score='median' is not one of max, mean"):
        SiameseNetwork(nn.Flatten(), n_way=3, feature_dim=D, shot_score="median")
    with pytest.raises(UserError, match="algo.pairs='every' is not one of sampled, all"):
        SiameseNetwork(nn.Flatten(), n_way=3, feature_dim=D, pairs="every")


# ----------------------------------------------------------------------------- Koch's affine distortions
def test_affine_warp_is_exact_for_integer_shifts_quarter_turns_and_the_identity():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 1, 9, 9, generator=g, dtype=torch.float64)
    zero, one = torch.zeros(3, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64)
    no_shear, no_shift = torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)
    torch.testing.assert_close(affine_warp(x, zero, no_shear, one, no_shift), x, rtol=0, atol=1e-12)
    shifted = affine_warp(x, zero, no_shear, one, torch.tensor([[1.0, 2.0]] * 3, dtype=torch.float64))
    expected = torch.zeros_like(x)
    expected[..., 2:, 1:] = x[..., :-2, :-1]  # content moves 1 px right (x) and 2 px down (y); zeros come in
    torch.testing.assert_close(shifted, expected, rtol=0, atol=1e-12)
    turned = affine_warp(x, torch.full((3,), math.pi / 2, dtype=torch.float64), no_shear, one, no_shift)
    torch.testing.assert_close(turned, torch.rot90(x, -1, (-2, -1)), rtol=0, atol=1e-12)  # clockwise on screen
    # a scale of 2 about the centre: the centre pixel of an odd-sized image stays where it is
    big = affine_warp(x, zero, no_shear, 2 * one, no_shift)
    torch.testing.assert_close(big[..., 4, 4], x[..., 4, 4], rtol=0, atol=1e-12)


def test_affine_augmentation_changes_training_images_and_is_off_at_evaluation():
    train_tf, eval_tf = build_transforms(None, {"affine": True})
    assert isinstance(train_tf, RandomAffine) and eval_tf is None  # evaluation: no transform at all
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 8:20, 12:16] = 1.0  # a bar
    torch.manual_seed(5)
    y = train_tf(x)
    changed = (y - x).abs().flatten(1).amax(1) > 1e-4
    # each image keeps the identity with probability 1/16 (all four parts off): most change, a few may not
    assert 40 <= int(changed.sum()) < 64 and y.shape == x.shape
    torch.manual_seed(5)
    assert torch.equal(train_tf(x), y)  # random numbers from torch's global generator: a seed repeats them
    assert build_transforms(None, {"affine": False}) == (None, None)


def test_the_lake_preset_is_the_readme_runs_command(compose_cfg):
    """experiment=siamese_omniglot_lake composes to the overrides of the README's Siamese row."""
    from omegaconf import OmegaConf

    row = ["algo=siamese", "data=omniglot", "data.split_scheme=lake", "data.within_alphabet=true", "data.n_way=20",
           "data.n_query=5", "algo.pairs=all", "data.image_size=56", "data.train_n_way=32", "data.train_n_shot=1",
           "data.train_n_query=3", "train.meta_batch_size=64", "train.steps=4200", "train.val_every=600",
           "train.val_episodes=200", "eval.n_episodes=1000"]
    preset = OmegaConf.to_container(compose_cfg(["experiment=siamese_omniglot_lake"]))
    assert preset == OmegaConf.to_container(compose_cfg(row))
    assert preset["data"]["augment"]["affine"] is True


def test_siamese_config_turns_the_affine_distortions_on(compose_cfg):
    cfg = compose_cfg(["algo=siamese", "debug=smoke"])
    assert cfg.data.augment.affine is True and cfg.algo._target_.endswith("SiameseNetwork")
    assert compose_cfg(["algo=protonet", "debug=smoke"]).data.augment.affine is False


# ----------------------------------------------------------------------------- the CLI
FAST = ["algo=siamese", "debug=smoke", "backbone.hidden=8", "device.threads=1", "train.meta_batch_size=6",
        "train.val_episodes=4", "eval.n_episodes=6", "eval.chunk=3"]
RESUMABLE = [*FAST, *RESUMABLE_STEPS]


ALL_PAIRS = [*RESUMABLE, "algo.pairs=all", "data.train_n_way=3", "data.train_n_shot=1", "data.train_n_query=1"]
RUNS = {"sampled": RESUMABLE, "all": ALL_PAIRS}  # (all: 6 pairs' images = two 3-way episodes of 2 images)


@pytest.fixture(scope="module", params=sorted(RUNS))
def unbroken(request, tmp_path_factory):
    """`fewshot train algo=siamese debug=smoke` (4 steps of 6 pairs, affine distortions on), and the same with
    algo.pairs=all, each run once: (pairs, run dir, its arguments)."""
    pairs = request.param
    return pairs, smoke_train(tmp_path_factory.mktemp(f"siamese_{pairs}"), RUNS[pairs])[0], RUNS[pairs]


def test_siamese_smoke_train_then_eval(unbroken, tmp_path):
    pairs, run, _ = unbroken
    rows = records(run)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    config = json.loads(json.dumps(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["config"]))
    assert config["data"]["augment"]["affine"] is True and config["algo"]["pairs"] == pairs
    smoke_eval(run, tmp_path, "algo.shot_score=mean", "eval.n_episodes=6")


@pytest.mark.slow
def test_siamese_killed_between_checkpoints_resumes_bitwise(unbroken, tmp_path):
    """The batch source's generator (pairs or episodes) and the affine distortions' global RNG: killed in step 3
    (last.pt at 2), resumed with resume=auto, the run ends bitwise equal to an unbroken one."""
    _, run_dir, args = unbroken
    run, at_kill = kill_and_resume(args, run_dir, tmp_path)
    at_2 = at_kill["sampler"]["generator"]
    at_4 = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["sampler"]["generator"]
    assert not torch.equal(at_2, at_4)  # the source moved on: its state is what the comparison above checked
