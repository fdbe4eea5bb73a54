"""`fewshot predict`: CSV, table and picture from a smoke-trained checkpoint on generated folders; the same
probabilities as the learner on a hand-built episode; the image conversion of training; one-line refusals;
and (slow) a ProtoNet trained here on real Omniglot, right on evaluation-set images."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_error_line, run_cli
from fewshot_runner.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

SMOKE = ["debug=smoke", "backbone.hidden=8", "device.threads=1", "train.val_episodes=4", "eval.n_episodes=4",
         "eval.chunk=4"]


def _compose(overrides, name):
    from hydra import compose, initialize_config_dir

    from fewshot_runner.cli import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.fixture(scope="module")
def protonet_ckpt(tmp_path_factory) -> Path:
    from fewshot_runner.engine.run import train

    run = tmp_path_factory.mktemp("protonet") / "run"
    train(_compose(["algo=protonet", *SMOKE], "train"), run_dir=run)
    return run / "checkpoints" / "best.pt"


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """support/<3 classes>/ (2 images each) and query/ (7 images) from the synthetic test classes, saved in
    mixed sizes, modes and formats (the model's input is 28x28 gray)."""
    from fewshot_runner.data.synthetic import Synthetic

    split = Synthetic().split("test")  # 20 images per class
    root = tmp_path_factory.mktemp("folders")
    img = lambda c, i: Image.fromarray(split.images[c * 20 + i, 0].numpy())  # noqa: E731
    for c, name in enumerate(["alpha", "beta", "gamma"]):
        _save(img(c, 0).resize((56, 56)).convert("RGB"), root / "support" / name / "a.png")
        _save(img(c, 1), root / "support" / name / "b.jpg")
    for c, i, how in [(0, 2, "L"), (0, 3, "RGB"), (1, 2, "RGBA"), (1, 3, "P"), (2, 2, "L"), (2, 3, "L"), (2, 4, "RGB")]:
        _save(img(c, i).resize((40, 30)).convert(how), root / "query" / f"q{c}{i}.png")
    return root / "support", root / "query"


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    return rows[0], rows[1:]


def test_predict_cli_writes_the_csv_the_table_and_the_picture(protonet_ckpt, folders, tmp_path):
    support, query = folders
    run = tmp_path / "run"
    out = tmp_path / "mine.csv"
    p = run_cli(["predict", f"checkpoint={protonet_ckpt}", f"support={support}", f"query={query}", f"out={out}",
                 "device=cpu", "device.threads=1", f"hydra.run.dir={run}"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    header, rows = read_csv(out)
    assert header == ["file", "predicted_class", "probability", "alpha", "beta", "gamma"]
    assert [r[0] for r in rows] == sorted(f.name for f in query.iterdir())  # one row per query image
    for r in rows:
        probs = np.array([float(v) for v in r[3:]])
        assert abs(probs.sum() - 1) < 1e-6 and (probs >= 0).all()
        assert r[1] == header[3 + int(probs.argmax())] and float(r[2]) == probs.max()
    assert (run / "predictions.png").stat().st_size > 1000 and not (run / "predictions.csv").exists()
    assert "q24.png" in p.stdout and "predicted class" in p.stdout  # the table


def _by_hand(ckpt: Path, support: Path, query: Path) -> torch.Tensor:
    """The learner's softmax on one episode built here: PIL gray, bilinear resize to 28, uint8 -> [0, 1]."""
    from omegaconf import OmegaConf

    from fewshot_runner.config import DeviceConfig
    from fewshot_runner.engine.build import build_learner
    from fewshot_runner.engine.checkpoint import load_checkpoint
    from fewshot_runner.engine.device import resolve_runtime
    from fewshot_runner.episode import Episode

    def load(f: Path) -> torch.Tensor:
        with Image.open(f) as im:
            if im.mode in ("RGBA", "P"):
                im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
            g = im.convert("L").resize((28, 28), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(g, dtype=np.uint8).copy()).unsqueeze(0).float() / 255

    state = load_checkpoint(ckpt)
    runtime = resolve_runtime(OmegaConf.structured(DeviceConfig(type="cpu", threads=1)))
    algo = build_learner(OmegaConf.create(state["config"]), (1, 28, 28), 5, runtime)
    algo.load_state_dict(state["model"])
    algo.eval()
    classes = sorted(support.iterdir())
    sx = torch.stack([load(f) for c in classes for f in sorted(c.iterdir())])
    sy = torch.tensor([i for i, c in enumerate(classes) for _ in c.iterdir()])
    qx = torch.stack([load(f) for f in sorted(query.iterdir())])
    with torch.no_grad():
        logits = algo.predict(Episode(sx[None], sy[None], qx[None], torch.zeros(1, len(qx), dtype=torch.long), 3))
    return torch.softmax(logits[0], -1)


def test_predictions_are_the_learners_on_the_support_episode(protonet_ckpt, folders, tmp_path):
    from fewshot_runner.predict import predict

    support, query = folders
    cfg = _compose([f"checkpoint={protonet_ckpt}", f"support={support}", f"query={query}", "device=cpu",
                    "device.threads=1"], "predict")
    res = predict(cfg, run_dir=tmp_path / "run")
    assert res["csv"] == tmp_path / "run" / "predictions.csv" and res["csv"].is_file()  # out= not given
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["predictions.csv", "predictions.png"]
    torch.testing.assert_close(res["probabilities"], _by_hand(protonet_ckpt, support, query), rtol=1e-5, atol=1e-6)


def test_omniglot_conversion_of_any_image_is_the_training_decoding():
    from fewshot_runner.data.decode import image_spec
    from fewshot_runner.data.omniglot import decode_image

    rng = np.random.default_rng(0)
    strokes = Image.fromarray((rng.random((105, 105)) > 0.2).astype(np.uint8) * 255).convert("1")  # as Omniglot's
    buf = io.BytesIO()
    strokes.save(buf, format="PNG")
    spec = image_spec({"_target_": "fewshot_runner.data.omniglot.Omniglot", "image_size": 28, "root": None})
    assert spec.x_shape == (1, 28, 28) and spec.invert
    np.testing.assert_array_equal(spec.decode(buf.getvalue())[0], decode_image(buf.getvalue(), 28))
    # black strokes on a transparent background: flattened onto white first, then inverted (strokes bright)
    rgba = Image.new("RGBA", (60, 60), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (20, 0, 40, 60))
    x = spec.convert(rgba)[0]
    assert x[:, :3].max() == 0 and x[:, 12:16].min() == 255
    synthetic = image_spec({"_target_": "fewshot_runner.data.synthetic.Synthetic", "image_size": 12, "channels": 3})
    assert synthetic.convert(Image.new("L", (30, 20), 77)).shape == (3, 12, 12)


@pytest.fixture(scope="module")
def maml_ckpt(tmp_path_factory) -> Path:
    from fewshot_runner.engine.run import train

    run = tmp_path_factory.mktemp("maml") / "run"
    train(_compose(["algo=maml", *SMOKE, "train.steps=1", "train.val_every=1", "train.ckpt_every=1"], "train"),
          run_dir=run)
    return run / "checkpoints" / "last.pt"


def _bad(tmp_path: Path, folders, case: str) -> tuple[list[str], str]:
    """Overrides for a bad-input case and a fragment of its message."""
    support, query = folders
    s, q = tmp_path / "s", tmp_path / "q"
    if case == "missing support":
        return [f"support={s}", f"query={query}"], "does not exist"
    if case == "missing query":
        return [f"support={support}", f"query={q}"], "does not exist"
    if case == "single class":
        _save(Image.new("L", (8, 8)), s / "only" / "a.png")
        return [f"support={s}", f"query={query}"], "single class (only)"
    if case == "empty class":
        _save(Image.new("L", (8, 8)), s / "a" / "a.png")
        (s / "b").mkdir()
        return [f"support={s}", f"query={query}"], "support class folder"
    if case == "no class folders":
        _save(Image.new("L", (8, 8)), s / "loose.png")
        return [f"support={s}", f"query={query}"], "beside the class folders"
    if case == "not an image":
        _save(Image.new("L", (8, 8)), q / "fine.png")
        (q / "notes.png").write_text("not a picture")
        return [f"support={support}", f"query={q}"], "notes.png is not an image"
    if case == "empty query":
        q.mkdir()
        return [f"support={support}", f"query={q}"], "holds no images"
    if case == "too small":
        return [f"support={support}", f"query={query}", "image_size=4"], "cannot take 4x4 images"
    raise AssertionError(case)


BAD = ["missing support", "missing query", "single class", "empty class", "no class folders", "not an image",
       "empty query", "too small"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_user_error(protonet_ckpt, folders, tmp_path, case):
    from fewshot_runner.predict import predict

    overrides, fragment = _bad(tmp_path, folders, case)
    cfg = _compose([f"checkpoint={protonet_ckpt}", *overrides, "device=cpu"], "predict")
    with pytest.raises(UserError, match=None) as e:
        predict(cfg, run_dir=tmp_path / "run")
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "run" / "predictions.csv").exists()


def test_a_fixed_head_takes_only_its_training_n_way(maml_ckpt, folders, tmp_path):
    from fewshot_runner.predict import predict

    support, query = folders  # 3 classes; the smoke MAML has a 5-way head
    cfg = _compose([f"checkpoint={maml_ckpt}", f"support={support}", f"query={query}", "device=cpu"], "predict")
    with pytest.raises(UserError, match=r"holds 3 classes but .*5-way head.*give support/ 5 class folders"):
        predict(cfg, run_dir=tmp_path / "run")


def test_bad_input_through_the_cli_is_one_line_and_leaves_no_run_dir(protonet_ckpt, folders, tmp_path):
    overrides, fragment = _bad(tmp_path, folders, "single class")
    run = tmp_path / "out" / "run"
    p = run_cli(["predict", f"checkpoint={protonet_ckpt}", *overrides, "device=cpu", f"hydra.run.dir={run}"], tmp_path)
    one_error_line(p, fragment)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- real Omniglot
@pytest.mark.slow
def test_protonet_trained_here_is_mostly_right_on_omniglot_evaluation_images(omniglot_root, tmp_path, monkeypatch):
    """ProtoNet trained 300 episodes on the background set (split_scheme=lake), then `fewshot predict` on
    original 105x105 evaluation-set PNGs (black strokes on white: the conversion must invert them): 5-way
    1-shot with 5 queries per class, over 4 episodes of characters from different alphabets."""
    import random
    import zipfile

    from fewshot_runner.engine.run import train
    from fewshot_runner.predict import predict

    monkeypatch.setenv("FEWSHOT_DATA", str(omniglot_root))
    train(_compose(["data=omniglot", "data.split_scheme=lake", "algo=protonet", "device=cpu", "logger=none",
                    "train.steps=300", "data.train_n_way=20", "data.train_n_query=5", "train.val_every=300",
                    "train.val_episodes=20", "train.progress=false", "eval.n_episodes=20"], "train"),
          run_dir=tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    with zipfile.ZipFile(omniglot_root / "omniglot" / "images_evaluation.zip") as z:
        members = sorted(n for n in z.namelist() if n.endswith(".png"))
        chars: dict[str, list[str]] = {}
        for n in members:
            chars.setdefault("/".join(n.split("/")[1:3]), []).append(n)
        rng = random.Random(0)
        right = total = 0
        for episode in range(4):
            picked = rng.sample(sorted(chars), 5)
            root = tmp_path / f"ep{episode}"
            truth = {}
            for c in picked:
                drawings = rng.sample(chars[c], 6)
                label = c.replace("/", "_")
                (root / "support" / label).mkdir(parents=True)
                (root / "support" / label / "shot.png").write_bytes(z.read(drawings[0]))
                (root / "query").mkdir(exist_ok=True)
                for i, m in enumerate(drawings[1:]):
                    name = f"{label}_{i}.png"
                    (root / "query" / name).write_bytes(z.read(m))
                    truth[name] = label
            args = [f"checkpoint={ckpt}", f"support={root / 'support'}", f"query={root / 'query'}", "device=cpu"]
            if episode == 0:  # once through the command itself
                p = run_cli(["predict", *args, f"hydra.run.dir={root / 'run'}"], tmp_path)
                assert p.returncode == 0, p.stderr[-2000:]
                _, rows = read_csv(root / "run" / "predictions.csv")
                got = {r[0]: r[1] for r in rows}
            else:
                res = predict(_compose(args, "predict"), run_dir=root / "run")
                got = dict(zip(res["files"], (res["classes"][k] for k in res["probabilities"].argmax(-1).tolist())))
            assert sorted(got) == sorted(truth)
            right += sum(got[f] == truth[f] for f in truth)
            total += len(truth)
    print(f"\nfewshot predict on Omniglot evaluation images: {right}/{total} right")
    assert right / total >= 0.8, f"{right}/{total} right"
