"""Baseline and Baseline++: the cosine and linear heads against a hand computation (float64), pre-training on
the training split's classes only, the test-time fit against the authors' per-task loop (nn.Linear / weight_norm
and torch.optim.SGD, float64), fitted on the support set alone, deterministic and independent of the block, and
the CLI (smoke, eval, kill + resume)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import RESUMABLE_STEPS, kill_and_resume, smoke_eval, smoke_train
from fewshot_runner.algorithms import baseline as bl
from fewshot_runner.algorithms.baseline import Baseline, BaselinePlusPlus, chen_scale, cosine_logits, fit_heads
from fewshot_runner.episode import Episode, LabelledBatch

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)
D = 5


def test_baseline_pp_cosine_head_equals_a_hand_computation():
    """scale * g_c * <z / (||z|| + 1e-5), v_c / ||v_c||> for every feature and class."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, D, generator=g, dtype=torch.float64)
    v = torch.randn(3, D, generator=g, dtype=torch.float64)
    gain = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    out = cosine_logits(z, v, gain, scale=2.0)
    for i in range(4):
        zn = math.sqrt(sum(z[i, j].item() ** 2 for j in range(D))) + 1e-5
        for c in range(3):
            vn = math.sqrt(sum(v[c, j].item() ** 2 for j in range(D)))
            dot = sum(z[i, j].item() * v[c, j].item() for j in range(D))
            assert out[i, c].item() == pytest.approx(2.0 * gain[c].item() * dot / (zn * vn), rel=1e-12)
    assert chen_scale(5) == 2.0 and chen_scale(200) == 2.0 and chen_scale(201) == 10.0 and chen_scale(4112) == 10.0


def _sized(cls, n_classes, **kw):
    torch.manual_seed(0)
    m = cls(nn.Flatten(), n_way=5, feature_dim=D, **kw).double()
    m.size_head(n_classes)
    return m


@pytest.mark.parametrize("cls", [Baseline, BaselinePlusPlus])
def test_pre_training_loss_is_cross_entropy_of_the_head_over_all_training_classes(cls):
    m = _sized(cls, 7)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, D, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 6, 3, 3, 1, 5])
    loss, metrics = m.meta_loss(LabelledBatch(x, y, 7))
    if cls.cosine:  # 7 classes: the authors' scale 2; g starts at ||v_c|| (weight norm's start)
        v, gain = m.head["v"], m.head["g"]
        torch.testing.assert_close(gain, v.norm(dim=-1))
        logits = 2.0 * (x / (x.norm(dim=1, keepdim=True) + 1e-5)) @ (v / v.norm(dim=1, keepdim=True) * gain[:, None]).T
    else:
        assert torch.equal(m.head["b"], torch.zeros(7, dtype=torch.float64))  # the authors' zero bias
        logits = x @ m.head["w"].T + m.head["b"]
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-12)
    assert 0 <= metrics["acc"].item() <= 1


def test_pre_training_sees_only_the_training_split_classes_and_images():
    from fewshot_runner.data.synthetic import Synthetic

    ds = Synthetic(n_classes_train=6, n_classes_val=3, n_classes_test=4, per_class=5, image_size=8, channels=1, seed=0)
    train = ds.split("train")
    m = Baseline(nn.Flatten(), n_way=5, feature_dim=64)
    opt_params = [p for p in m.parameters()]
    source = m.batch_source(train, 5, 1, 5, seed=3)
    assert m.n_classes == train.n_classes == 6
    assert all(a is b for a, b in zip(opt_params, m.parameters()))  # sized in place: the optimizer's tensors
    others = torch.cat([ds.split("val").images, ds.split("test").images]).flatten(1)
    for _ in range(8):
        batch = source.sample(7)
        assert isinstance(batch, LabelledBatch) and batch.n_classes == 6
        assert int(batch.y.min()) >= 0 and int(batch.y.max()) < 6
        for x, y in zip(batch.x.flatten(1), batch.y):
            own = train.images[train.labels == y].flatten(1)
            assert (own == x).all(1).any()  # one of its own class's training images
            assert not (others == x).all(1).any()  # never a validation or test image
        loss, _ = m.meta_loss(batch.to("cpu"))
        assert torch.isfinite(loss)


def _authors_fit(support_z, support_y, query_z, n_way, cosine, scale, epochs, seed):
    """The authors' set_forward_adaptation for each task alone: nn.Linear (Baseline) or nn.Linear without bias
    under weight_norm(dim=0) on normalised features (Baseline++), torch.optim.SGD(lr 0.01, momentum 0.9,
    dampening 0.9, weight decay 0.001), mini-batches of 4 of a fresh permutation per epoch."""
    out = []
    for t in range(support_z.shape[0]):
        g = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(D)
        lin = nn.Linear(D, n_way, bias=not cosine).double()
        with torch.no_grad():
            lin.weight.copy_((torch.rand(n_way, D, generator=g, dtype=torch.float64) * 2 - 1) * bound)
            if not cosine:
                lin.bias.copy_((torch.rand(n_way, generator=g, dtype=torch.float64) * 2 - 1) * bound)
        if cosine:
            lin = nn.utils.parametrizations.weight_norm(lin, dim=0)

        def clf(z):
            return scale * lin(z / (z.norm(dim=1, keepdim=True) + 1e-5)) if cosine else lin(z)

        opt = torch.optim.SGD(lin.parameters(), lr=0.01, momentum=0.9, dampening=0.9, weight_decay=0.001)
        S = support_z.shape[1]
        for _ in range(epochs):
            rand_id = torch.randperm(S, generator=g)
            for i in range(0, S, 4):
                sel = rand_id[i:min(i + 4, S)]
                opt.zero_grad()
                F.cross_entropy(clf(support_z[t][sel]), support_y[t][sel]).backward()
                opt.step()
        with torch.no_grad():
            out.append(clf(query_z[t]))
    return torch.stack(out)


def _features(n_tasks=3, n_way=3, n_shot=3, n_query=2, seed=4):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n_tasks, n_way, 1, D, generator=g, dtype=torch.float64) * 2
    sz = (means + 0.5 * torch.randn(n_tasks, n_way, n_shot, D, generator=g, dtype=torch.float64)).flatten(1, 2)
    qz = (means + 0.5 * torch.randn(n_tasks, n_way, n_query, D, generator=g, dtype=torch.float64)).flatten(1, 2)
    sy = torch.arange(n_way).repeat_interleave(n_shot).repeat(n_tasks, 1)
    perm = torch.randperm(sy.shape[1], generator=g)  # not class-major
    qy = torch.arange(n_way).repeat_interleave(n_query).repeat(n_tasks, 1)
    return sz[:, perm], sy[:, perm], qz, qy


@pytest.mark.parametrize("cosine", [False, True])
def test_batched_test_time_fit_equals_the_authors_loop_per_task(cosine):
    """9 support images: batches of 4, 4, 1 per epoch; 6 epochs; three tasks at once against one at a time."""
    sz, sy, qz, _ = _features()
    heads = fit_heads(sz, sy, 3, cosine, scale=2.0, epochs=6, seed=7)
    got = bl.head_logits(qz, heads, 2.0)
    expected = _authors_fit(sz, sy, qz, 3, cosine, 2.0, epochs=6, seed=7)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    untrained = bl.head_logits(qz, {k: v[:1].expand_as(v) for k, v in fit_heads(sz, sy, 3, cosine, 2.0, epochs=0,
                                                                                     seed=7).items()}, 2.0)
    assert not torch.allclose(got, untrained)  # the fit moved the heads


@pytest.mark.parametrize("cls", [Baseline, BaselinePlusPlus])
def test_test_time_head_is_fitted_on_the_support_set_only(cls, monkeypatch):
    """Other query images: the same fitted head, bit for bit (the queries never reach the fit); other support
    images: another head."""
    fitted = []

    def spy(*args, **kw):
        heads = fit_heads(*args, **kw)
        fitted.append(heads)
        return heads

    monkeypatch.setattr(bl, "fit_heads", spy)
    m = _sized(cls, 7, fit_epochs=3).eval()
    sz, sy, qz, qy = _features()
    m.predict(Episode(sz, sy, qz, qy, 3))
    m.predict(Episode(sz, sy, qz * -3 + 1, qy, 3))
    m.predict(Episode(sz + 0.1, sy, qz, qy, 3))
    assert len(fitted) == 3 and fitted[0].keys() == fitted[1].keys()
    assert all(torch.equal(fitted[0][k], fitted[1][k]) for k in fitted[0])
    assert not all(torch.equal(fitted[0][k], fitted[2][k]) for k in fitted[0])


@pytest.mark.parametrize("cls", [Baseline, BaselinePlusPlus])
def test_test_time_fit_is_deterministic_independent_of_the_block_and_leaves_the_global_rng(cls):
    m = _sized(cls, 7).eval()  # the authors' 100 epochs
    sz, sy, qz, qy = _features(n_tasks=4)
    ep = Episode(sz, sy, qz, qy, 3)
    before = torch.get_rng_state()
    with torch.no_grad():  # as evaluate() calls it
        whole = m.predict(ep)
        again = m.predict(ep)
        parts = torch.cat([m.predict(ep.tasks(0, 1)), m.predict(ep.tasks(1, 4))])
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(whole, again)
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)
    assert (whole.argmax(-1) == qy).float().mean() > 0.8  # well-separated classes are learned from 3 shots


def test_a_checkpoint_head_of_another_width_is_taken_on_load():
    """fewshot eval builds the learner without a batch source: the training head takes the checkpoint's width."""
    trained = _sized(BaselinePlusPlus, 11)
    fresh = BaselinePlusPlus(nn.Flatten(), n_way=5, feature_dim=D).double()
    assert fresh.n_classes == 0
    fresh.load_state_dict(trained.state_dict())
    assert fresh.n_classes == 11 and torch.equal(fresh.head["v"], trained.head["v"])


# ----------------------------------------------------------------------------- the CLI
FAST = ["algo=baseline", "debug=smoke", "backbone.hidden=8", "device.threads=1", "train.meta_batch_size=8",
        "algo.fit_epochs=20", "train.val_episodes=4", "eval.n_episodes=6", "eval.chunk=3"]
# with a weight average: the engine sets it up after batch_source has sized the head over the training classes
RESUMABLE = [*FAST, *RESUMABLE_STEPS, "train.ema_decay=0.5"]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """`fewshot train algo=baseline debug=smoke` (4 steps of 8 images), run once for the tests below."""
    return smoke_train(tmp_path_factory.mktemp("baseline"), RESUMABLE)[0]


def test_baseline_smoke_train_then_eval(unbroken, tmp_path):
    state = torch.load(unbroken / "checkpoints" / "last.pt", weights_only=True)
    assert state["model"]["head.w"].shape == (64, 8)  # the synthetic training split's 64 classes, Conv4's 8 features
    assert state["ema"]["weights"]["head.w"].shape == (64, 8) and state["ema"]["updates"] == 4
    smoke_eval(unbroken, tmp_path, "algo.fit_epochs=5", "eval.n_episodes=6")


@pytest.mark.slow
def test_baseline_pp_smoke_train():
    """`fewshot train algo=baselinepp debug=smoke`: the cosine head through the whole run."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        run, _ = smoke_train(Path(d), [*FAST, "algo=baselinepp"])
        assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]["head.v"].shape == (64, 8)


@pytest.mark.slow
def test_baseline_killed_between_checkpoints_resumes_bitwise(unbroken, tmp_path):
    """The class-batch source's epoch permutation and cursor: killed in step 3 (last.pt at 2), resumed with
    resume=auto, the run ends bitwise equal to an unbroken one."""
    run, at_kill = kill_and_resume(RESUMABLE, unbroken, tmp_path)
    at_2 = at_kill["sampler"]
    at_4 = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["sampler"]
    assert (at_2["cursor"], at_4["cursor"]) == (16, 32)  # 2 and 4 batches of 8 into the first epoch's permutation


@pytest.mark.parametrize("key, value, message", [
    ("fit_epochs", 0, "algo.fit_epochs must be a positive integer (got 0)"),
    ("fit_batch", 2.5, "algo.fit_batch must be a positive integer (got 2.5)"),
    ("fit_lr", -0.1, "algo.fit_lr must be a positive number (got -0.1)"),
    ("scale", 0.0, "algo.scale must be a positive number or null (got 0.0)"),
])
def test_bad_settings_are_one_clear_line(key, value, message):
    from fewshot_runner.errors import UserError

    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BaselinePlusPlus(nn.Flatten(), n_way=5, feature_dim=D, **{key: value})
