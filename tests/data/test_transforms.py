"""The transform hook: normalisation, training-only augmentation on float images (any leading
dims), randomness from the global generator, config checks with one-line errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fewshot_runner.data.transforms import ColorJitter, RandomCrop, RandomHorizontalFlip, build_transforms
from fewshot_runner.errors import DataError

AUG = {"crop_padding": 2, "flip": True, "color_jitter": 0.4}
NORM = {"mean": [0.5, 0.25, 0.125], "std": [0.5, 0.2, 0.1]}


def _images(*lead, c=3, h=6, w=5, seed=0):
    return torch.rand(*lead, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_defaults_and_nulls_are_the_identity():
    assert build_transforms(None, None) == (None, None)
    assert build_transforms(None, {"crop_padding": 0, "flip": False, "color_jitter": 0.0}) == (None, None)


def test_normalisation_is_x_minus_mean_over_std_per_channel():
    x = _images(4)
    train_tf, eval_tf = build_transforms(NORM, None)
    want = torch.stack([(x[:, c] - NORM["mean"][c]) / NORM["std"][c] for c in range(3)], dim=1)
    for tf in (train_tf, eval_tf):
        y = tf(x)
        assert y.dtype == torch.float64 and torch.allclose(y, want, rtol=0, atol=1e-15)
    one = build_transforms({"mean": [0.5], "std": [0.25]}, None)[1]  # one value for every channel
    assert torch.allclose(one(x), (x - 0.5) / 0.25, rtol=0, atol=1e-15)
    with pytest.raises(DataError, match="mean has 3 values but the images have 1 channels"):
        eval_tf(_images(2, c=1))


def test_eval_transform_never_augments_nor_draws_random_numbers():
    _, eval_tf = build_transforms(NORM, AUG)
    x = _images(3, 4)
    before = torch.random.get_rng_state()
    y1, y2 = eval_tf(x), eval_tf(x)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(y1, y2) and torch.allclose(y1, build_transforms(NORM, None)[1](x), rtol=0, atol=0)
    assert build_transforms(None, AUG)[1] is None  # augmentation only: eval is the identity


def test_train_transform_keeps_any_leading_shape_and_same_global_seed_gives_same_output():
    train_tf, _ = build_transforms(NORM, AUG)
    x = _images(2, 7)  # (tasks, images, C, H, W)
    torch.manual_seed(3)
    a = train_tf(x)
    torch.manual_seed(3)
    b = train_tf(x)
    c = train_tf(x)  # the generator moved on
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_flip_mirrors_whole_images_about_half_the_time():
    x = _images(400)
    torch.manual_seed(0)
    y = RandomHorizontalFlip()(x.view(20, 20, 3, 6, 5)).view(400, 3, 6, 5)
    flipped = torch.tensor([torch.equal(y[i], x[i].flip(-1)) for i in range(400)])
    kept = torch.tensor([torch.equal(y[i], x[i]) for i in range(400)])
    assert (flipped | kept).all() and 150 < int(flipped.sum()) < 250


def test_crop_is_a_window_of_the_zero_padded_image_at_a_random_offset():
    p = 2
    x = _images(60, h=6, w=5)
    torch.manual_seed(1)
    y = RandomCrop(p)(x.view(6, 10, 3, 6, 5)).view(60, 3, 6, 5)
    padded = F.pad(x, (p, p, p, p))
    offsets = set()
    for i in range(60):
        hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                if torch.equal(y[i], padded[i, :, dy:dy + 6, dx:dx + 5])]
        assert hits, i
        offsets.add(hits[0])
    assert len(offsets) > 10  # offsets vary per image


def test_color_jitter_matches_torchvision_functional_with_the_same_factors():
    from torchvision.transforms import functional as TF

    s = 0.4
    for c in (3, 1):
        x = _images(5, c=c)
        torch.manual_seed(7)
        y = ColorJitter(s)(x)
        torch.manual_seed(7)
        f = (1 - s) + 2 * s * torch.rand(3, 5, 1, 1, 1, dtype=torch.float64)  # the draws ColorJitter makes
        for i in range(5):
            want = TF.adjust_brightness(x[i], float(f[0, i]))
            want = TF.adjust_contrast(want, float(f[1, i]))
            want = TF.adjust_saturation(want, float(f[2, i]))
            assert torch.allclose(y[i], want, rtol=0, atol=1e-12), (c, i)
        assert 0 <= float(y.min()) and float(y.max()) <= 1


def test_transforms_take_omegaconf_nodes():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"normalize": NORM, "augment": {"crop_padding": 1, "flip": False, "color_jitter": 0.0}})
    train_tf, eval_tf = build_transforms(cfg.normalize, cfg.augment, channels=3)
    assert train_tf is not None and eval_tf is not None and train_tf(_images(2)).shape == (2, 3, 6, 5)


@pytest.mark.parametrize("normalize, augment, key", [
    ({"mean": [0.5, 0.5], "std": [0.2]}, None, "data.normalize.mean has 2 values but data.normalize.std has 1"),
    ({"mean": [0.5]}, None, "data.normalize.std is missing"),
    ({"mean": [0.5], "std": [0.0]}, None, "data.normalize.std must be positive"),
    ({"mean": "0.5", "std": [0.2]}, None, "data.normalize.mean must be a list of numbers"),
    ({"mean": [0.5], "std": [1], "scale": 2}, None, "data.normalize has no key 'scale'"),
    ([0.5], None, "data.normalize must be null or"),
    (None, {"crop_padding": -1}, "data.augment.crop_padding must be an integer >= 0"),
    (None, {"crop_padding": 1.5}, "data.augment.crop_padding"),
    (None, {"flip": "yes"}, "data.augment.flip must be true or false"),
    (None, {"color_jitter": -0.1}, "data.augment.color_jitter must be a number >= 0"),
    (None, {"rotate": 90}, "data.augment has no key 'rotate'"),
    ({"mean": [0.5, 0.5], "std": [1, 1]}, None, "data.normalize.mean has 2 values but the images have 3 channels"),
])
def test_bad_transform_config_is_one_line_naming_the_key(normalize, augment, key):
    with pytest.raises(DataError) as err:
        build_transforms(normalize, augment, channels=3)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_transforms_refuse_uint8_images():
    train_tf, _ = build_transforms(None, AUG)
    with pytest.raises(DataError, match="float images"):
        train_tf(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))


@pytest.mark.gpu
def test_transforms_run_on_the_device_from_its_global_generator():
    train_tf, eval_tf = build_transforms(NORM, AUG)
    x = _images(4, 8).float().cuda()
    torch.cuda.manual_seed(5)
    a = train_tf(x)
    torch.cuda.manual_seed(5)
    assert a.is_cuda and torch.equal(a, train_tf(x)) and eval_tf(x).is_cuda
