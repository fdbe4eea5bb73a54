"""Omniglot loader: layouts, cache, errors on tiny generated data in the real on-disk format,
and the real data set when ../shared/data/omniglot (or $FEWSHOT_DATA/omniglot) is there."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from fewshot_runner.data import omniglot as om
from fewshot_runner.data.omniglot import Omniglot, load_split_names
from fewshot_runner.errors import DataError

# ----------------------------------------------------------------------------- tiny fake Omniglot
# set -> alphabet -> number of characters; 3 drawings per character (the real data has 20)
FAKE = {
    "images_background": {"Alpha_(Test)": 3, "Beta": 2},
    "images_evaluation": {"Gamma": 2},
}
PER = 3
ROTS = ("rot000", "rot090", "rot180", "rot270")


def _glyph(char_id: int, drawer: int) -> Image.Image:
    """105x105 mode-"1" PNG like the real ones: white background, black strokes.

    An L-shaped stroke in the top-left quadrant (so rotations are told apart), plus a
    per-character bar, slightly shifted per drawer.
    """
    im = Image.new("1", (105, 105), 1)
    d = ImageDraw.Draw(im)
    o = drawer
    d.rectangle([8 + o, 8, 14 + o, 45], fill=0)  # vertical bar of the L, top-left
    d.rectangle([8 + o, 8, 45 + o, 14], fill=0)  # horizontal bar of the L, top edge
    y = 55 + 5 * (char_id % 8)
    d.rectangle([55, y, 95, y + 4], fill=0)  # character-specific bar, bottom right
    return im


def _files():
    """(relative path, PNG bytes) for every image, with real-style names IIII_SS.png."""
    import io

    char_id = 0
    for set_name, alphabets in FAKE.items():
        for alphabet, n_chars in alphabets.items():
            for c in range(1, n_chars + 1):
                char_id += 1
                for drawer in range(1, PER + 1):
                    buf = io.BytesIO()
                    _glyph(char_id, drawer).save(buf, format="PNG")
                    yield f"{set_name}/{alphabet}/character{c:02d}/{char_id:04d}_{drawer:02d}.png", buf.getvalue()


def write_zips(folder: Path, extra_members: dict[str, bytes] | None = None) -> None:
    """images_background.zip and images_evaluation.zip with directory entries, like the real ones."""
    folder.mkdir(parents=True, exist_ok=True)
    files = list(_files())
    for set_name in FAKE:
        with zipfile.ZipFile(folder / f"{set_name}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            dirs = set()
            for rel, data in files:
                if not rel.startswith(set_name + "/"):
                    continue
                parts = rel.split("/")
                for i in range(1, len(parts)):
                    d = "/".join(parts[:i]) + "/"
                    if d not in dirs:
                        dirs.add(d)
                        zf.writestr(d, b"")
                zf.writestr(rel, data)
            for name, data in (extra_members or {}).items():
                if name.startswith(set_name) or name.startswith(("/", "..")):
                    zf.writestr(zipfile.ZipInfo(name), data)


def write_tree(folder: Path) -> None:
    for rel, data in _files():
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


@pytest.fixture
def split_dir(tmp_path: Path) -> Path:
    """train: Alpha (3 chars), val: Beta (2), test: Gamma (2); each in 4 rotations."""
    d = tmp_path / "splits"
    d.mkdir()
    chars = {"train": [f"Alpha_(Test)/character{c:02d}" for c in (1, 2, 3)],
             "val": [f"Beta/character{c:02d}" for c in (1, 2)],
             "test": [f"Gamma/character{c:02d}" for c in (1, 2)]}
    lines = {s: [f"{c}/{r}" for c in cs for r in ROTS] for s, cs in chars.items()}
    lines["trainval"] = lines["train"] + lines["val"]
    for s, ls in lines.items():
        (d / f"{s}.txt").write_text("\n".join(ls) + "\n")
    return d


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def load(root, split_dir, cache_dir, **kw):
    return Omniglot(root=str(root), split_dir=split_dir, cache_dir=cache_dir, workers=1, **kw)


def _check_fake(ds) -> None:
    assert ds.name == "omniglot"
    sizes = {s: ds.split(s).n_classes for s in ("train", "val", "test", "trainval")}
    assert sizes == {"train": 12, "val": 8, "test": 8, "trainval": 20}
    tr = ds.split("train")
    assert tr.images.dtype == torch.uint8 and tr.x_shape == (1, 28, 28)
    assert tr.min_per_class == PER and int(tr.counts.max()) == PER
    assert tr.class_names[:4] == [f"Alpha_(Test)/character01/{r}" for r in ROTS]


# ----------------------------------------------------------------------------- layouts
def test_zip_layout_is_read_in_place_with_rotated_classes(tmp_path, split_dir, cache_dir):
    root = tmp_path / "omniglot"
    write_zips(root)
    ds = load(root, split_dir, cache_dir)
    _check_fake(ds)
    assert sorted(p.name for p in root.iterdir()) == ["images_background.zip", "images_evaluation.zip"]  # nothing extracted


def test_image_is_inverted_resized_and_rotated_counterclockwise(tmp_path, split_dir, cache_dir):
    root = tmp_path / "omniglot"
    write_zips(root)
    tr = load(root, split_dir, cache_dir).split("train")
    x = tr.images.view(tr.n_classes, PER, 28, 28).float()
    upright = x[0, 0]
    assert upright[-3:, :3].max() == 0 and upright[:, -1].max() == 0  # background 0
    assert upright.max() >= 250  # strokes bright
    # the L sits top-left; 90 degrees counterclockwise (PIL's rotate(90)) moves it bottom-left
    def quadrant_mass(img):
        h = img.shape[0] // 2
        return {"tl": img[:h, :h].sum(), "tr": img[:h, h:].sum(), "bl": img[h:, :h].sum(), "br": img[h:, h:].sum()}
    q = quadrant_mass(x[1, 0])
    assert q["bl"] == max(q.values())
    # same as decoding the PNG rotated by PIL (rotate and resize commute up to rounding)
    pil_rot = Image.open(_png_bytes(root, "Alpha_(Test)/character01", 0))
    ref = torch.from_numpy(om.decode_image(_pil_bytes(pil_rot.rotate(90)), 28).copy()).float()
    assert (ref - x[1, 0]).abs().max() <= 1
    for k in range(4):
        assert torch.equal(x[k, 0], torch.rot90(x[0, 0], k, dims=(0, 1)))
    assert not torch.equal(x[0, 0], x[1, 0]) and not torch.equal(x[0, 0], x[2, 0])


def _png_bytes(root: Path, char: str, i: int):
    import io

    with zipfile.ZipFile(root / "images_background.zip") as zf:
        name = sorted(n for n in zf.namelist() if n.startswith(f"images_background/{char}/") and n.endswith(".png"))[i]
        return io.BytesIO(zf.read(name))


def _pil_bytes(im: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("layout", ["torchvision_tree", "plain_tree", "zips_in_omniglot_py"])
def test_other_layouts_give_the_same_images(tmp_path, split_dir, layout):
    zroot = tmp_path / "zips"
    write_zips(zroot)
    ref = load(zroot, split_dir, tmp_path / "c1")
    root = tmp_path / "omniglot"
    if layout == "torchvision_tree":
        write_tree(root / "omniglot-py")
    elif layout == "plain_tree":
        write_tree(root)
    else:
        write_zips(root / "omniglot-py")
    ds = load(root, split_dir, tmp_path / "c2")
    for s in ("train", "val", "test", "trainval"):
        assert ds.split(s).class_names == ref.split(s).class_names
        assert torch.equal(ds.split(s).images, ref.split(s).images)


def test_root_defaults_to_fewshot_data(tmp_path, split_dir, cache_dir, monkeypatch):
    write_zips(tmp_path / "data" / "omniglot")
    monkeypatch.setenv("FEWSHOT_DATA", str(tmp_path / "data"))
    ds = Omniglot(split_dir=split_dir, cache_dir=cache_dir, workers=1)
    _check_fake(ds)


def test_rotations_false_keeps_upright_classes(tmp_path, split_dir, cache_dir):
    write_zips(tmp_path / "o")
    ds = load(tmp_path / "o", split_dir, cache_dir, rotations=False)
    assert ds.split("train").class_names == [f"Alpha_(Test)/character{c:02d}/rot000" for c in (1, 2, 3)]


def test_other_image_size(tmp_path, split_dir, cache_dir):
    write_zips(tmp_path / "o")
    ds = load(tmp_path / "o", split_dir, cache_dir, image_size=14)
    assert ds.x_shape == (1, 14, 14)


def test_process_pool_decoding_matches_serial(tmp_path, split_dir, monkeypatch):
    write_zips(tmp_path / "o")
    serial = load(tmp_path / "o", split_dir, tmp_path / "c1")
    monkeypatch.setattr(om, "_POOL_MIN_IMAGES", 1)
    monkeypatch.setattr(om, "_CHUNK", 4)
    pooled = Omniglot(root=str(tmp_path / "o"), split_dir=split_dir, cache_dir=tmp_path / "c2", workers=2)
    assert torch.equal(serial.split("trainval").images, pooled.split("trainval").images)


# ----------------------------------------------------------------------------- cache
def test_second_load_reads_the_cache(tmp_path, split_dir, cache_dir, monkeypatch):
    write_zips(tmp_path / "o")
    first = load(tmp_path / "o", split_dir, cache_dir)
    files = list(cache_dir.iterdir())
    assert len(files) == 1 and files[0].name.startswith("omniglot_28_") and files[0].suffix == ".pt"
    obj = torch.load(files[0], weights_only=True)
    assert obj["image_size"] == 28 and obj["file_count"] == 7 * PER and obj["images"].dtype == torch.uint8

    def no_decode(*a, **k):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(om, "decode_all", no_decode)
    second = load(tmp_path / "o", split_dir, cache_dir)
    assert torch.equal(first.split("trainval").images, second.split("trainval").images)


@pytest.mark.parametrize("garbage", [b"", b"not a torch file", "truncate"])
def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, split_dir, cache_dir, garbage):
    write_zips(tmp_path / "o")
    first = load(tmp_path / "o", split_dir, cache_dir)
    (cache_file,) = cache_dir.iterdir()
    data = cache_file.read_bytes()
    cache_file.write_bytes(data[: len(data) // 2] if garbage == "truncate" else garbage)
    with pytest.warns(UserWarning, match="cache .* corrupt"):
        again = load(tmp_path / "o", split_dir, cache_dir)
    assert torch.equal(first.split("train").images, again.split("train").images)
    assert torch.load(cache_file, weights_only=True)["file_count"] == 7 * PER  # rewritten, valid


def test_stale_cache_is_rebuilt(tmp_path, split_dir, cache_dir, monkeypatch):
    root = tmp_path / "o"
    write_tree(root)
    load(root, split_dir, cache_dir)
    extra = root / "images_evaluation" / "Gamma" / "character03"
    extra.mkdir()
    for i in range(PER):
        _glyph(99, i).save(extra / f"0099_{i:02d}.png")
    calls = []
    real = om.decode_all
    monkeypatch.setattr(om, "decode_all", lambda *a, **k: calls.append(1) or real(*a, **k))
    load(root, split_dir, cache_dir)
    assert calls == [1]
    (cache_file,) = cache_dir.iterdir()
    assert torch.load(cache_file, weights_only=True)["file_count"] == 8 * PER


def test_cache_goes_to_root_when_writable_else_elsewhere(tmp_path, monkeypatch):
    monkeypatch.delenv("FEWSHOT_CACHE", raising=False)
    root = tmp_path / "o"
    root.mkdir()
    assert om.cache_path(root, 28) == root / ".fewshot_cache" / "omniglot_28.pt"
    monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path / "env"))
    assert om.cache_path(root, 28).parent == tmp_path / "env"
    assert om.cache_path(root, 28, cache_dir=tmp_path / "arg").parent == tmp_path / "arg"
    monkeypatch.delenv("FEWSHOT_CACHE")
    root.chmod(0o555)
    try:
        p = om.cache_path(root, 28)
        assert p.parent == Path.home() / ".cache" / "fewshot" and p.name.startswith("omniglot_28_")
    finally:
        root.chmod(0o755)


# ----------------------------------------------------------------------------- errors
def test_missing_data_says_where_and_how_to_fix(tmp_path, split_dir):
    for root in (tmp_path / "empty", tmp_path / "nowhere"):
        if root.name == "empty":
            root.mkdir()
        with pytest.raises(DataError) as err:
            load(root, split_dir, tmp_path / "c")
        msg = str(err.value)
        assert "\n" not in msg
        assert msg.startswith(f"no Omniglot data under {root}")
        assert "images_background.zip" in msg and "data.download=true" in msg


def test_half_the_data_names_the_missing_set(tmp_path, split_dir):
    write_zips(tmp_path / "o")
    (tmp_path / "o" / "images_evaluation.zip").unlink()
    with pytest.raises(DataError, match="no images_evaluation") as err:
        load(tmp_path / "o", split_dir, tmp_path / "c")
    assert "\n" not in str(err.value)


def test_corrupt_zip_names_the_file(tmp_path, split_dir):
    write_zips(tmp_path / "o")
    bad = tmp_path / "o" / "images_background.zip"
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(DataError) as err:
        load(tmp_path / "o", split_dir, tmp_path / "c")
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_corrupt_png_inside_a_zip_names_the_member(tmp_path, split_dir):
    root = tmp_path / "o"
    write_zips(root)
    zpath = root / "images_evaluation.zip"
    with zipfile.ZipFile(zpath) as zf:
        members = [(info, zf.read(info)) for info in zf.infolist()]
    with zipfile.ZipFile(zpath, "w") as zf:
        for info, data in members:
            zf.writestr(info, b"\x89PNG garbage" if info.filename.endswith("0007_02.png") else data)
    with pytest.raises(DataError, match="images_evaluation/Gamma/character02/0007_02.png") as err:
        Omniglot(root=str(root), split_dir=split_dir, cache_dir=tmp_path / "c", workers=1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("member", ["images_background/../../evil.png", "/images_background/Beta/character01/x.png",
                                    "images_background/Beta/../../../etc/x.png"])
def test_zip_members_escaping_the_folder_are_refused(tmp_path, split_dir, member):
    write_zips(tmp_path / "o", extra_members={member: b"x"})
    with pytest.raises(DataError, match="unsafe member") as err:
        load(tmp_path / "o", split_dir, tmp_path / "c")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "evil.png").exists()


def test_split_naming_an_absent_character_is_an_error(tmp_path, split_dir):
    write_zips(tmp_path / "o")
    with open(split_dir / "test.txt", "a") as f:
        f.write("Gamma/character09/rot000\n")
    with pytest.raises(DataError, match="Gamma/character09"):
        load(tmp_path / "o", split_dir, tmp_path / "c")


def test_bad_arguments(tmp_path, split_dir):
    with pytest.raises(DataError, match="split scheme"):
        Omniglot(root=str(tmp_path), split_scheme="nope")
    with pytest.raises(DataError, match="image_size"):
        Omniglot(root=str(tmp_path), image_size=0)
    (split_dir / "val.txt").write_text("Beta/character01\n")
    with pytest.raises(DataError, match="val.txt"):
        load_split_names("vinyals", split_dir)


def test_maml_split_scheme_is_a_seeded_random_character_split():
    """data.split_scheme=maml: characters shuffled (seed 1) into train / val / rest, four rotations each,
    the same split whatever order the characters come in, and different from another seed's."""
    from fewshot_runner.data.omniglot import random_character_split

    chars = [f"A{a}/character{c:02d}" for a in range(6) for c in range(1, 11)]  # 60 characters, 6 alphabets
    split = random_character_split(chars, n_train=40, n_val=5)
    assert {k: len(v) for k, v in split.items()} == {"train": 160, "val": 20, "test": 60, "trainval": 180}
    assert split["trainval"] == split["train"] + split["val"]
    per = {k: {n.rsplit("/", 1)[0] for n in split[k]} for k in ("train", "val", "test")}
    assert not (per["train"] & per["val"] or per["train"] & per["test"] or per["val"] & per["test"])
    assert set().union(*per.values()) == set(chars)
    assert split["test"][:4] == [f"{sorted(per['test'])[0]}/rot{r:03d}" for r in (0, 90, 180, 270)]
    alphabets = {k: {c.split("/")[0] for c in v} for k, v in per.items()}
    assert alphabets["test"] & alphabets["train"]  # not alphabet-disjoint, unlike the Vinyals split
    assert random_character_split(list(reversed(chars)), n_train=40, n_val=5) == split
    assert random_character_split(chars, n_train=40, n_val=5, seed=2)["test"] != split["test"]


def test_maml_split_scheme_needs_the_full_data(tmp_path, cache_dir):
    write_zips(tmp_path)
    with pytest.raises(DataError, match="split_scheme=maml needs more than 1200 characters"):
        Omniglot(root=str(tmp_path), split_scheme="maml", cache_dir=cache_dir, workers=1)


# ----------------------------------------------------------------------------- download
def test_download_uses_torchvision_for_missing_sets(tmp_path, split_dir, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeTorchvisionOmniglot:
        def __init__(self, root, background=True, download=False, **kw):
            calls.append((root, background, download))
            set_name = "images_background" if background else "images_evaluation"
            for rel, data in _files():
                if rel.startswith(set_name):
                    p = Path(root) / "omniglot-py" / rel
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(data)

    monkeypatch.setattr(torchvision.datasets, "Omniglot", FakeTorchvisionOmniglot)
    root = tmp_path / "fresh"
    _check_fake(load(root, split_dir, tmp_path / "c", download=True))
    assert calls == [(str(root), True, True), (str(root), False, True)]
    calls.clear()
    load(root, split_dir, tmp_path / "c", download=True)  # present now: no second download
    assert calls == []


def test_download_failure_is_one_line(tmp_path, split_dir, monkeypatch):
    import torchvision.datasets

    def offline(*a, **k):
        raise RuntimeError("Failed to download\n(no network)")

    monkeypatch.setattr(torchvision.datasets, "Omniglot", offline)
    with pytest.raises(DataError, match="downloading Omniglot images_background") as err:
        load(tmp_path / "x", split_dir, tmp_path / "c", download=True)
    assert "\n" not in str(err.value)


def test_module_import_does_not_import_torchvision():
    code = "import sys, fewshot_runner.data.omniglot; print('torchvision' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


# ----------------------------------------------------------------------------- shipped split files
def test_packaged_vinyals_split():
    names = load_split_names("vinyals")
    assert {s: len(v) for s, v in names.items()} == {"train": 4112, "val": 688, "test": 1692, "trainval": 4800}
    assert names["trainval"] == names["train"] + names["val"]
    chars = {s: {n.rsplit("/", 1)[0] for n in names[s]} for s in ("train", "val", "test")}
    assert not (chars["train"] & chars["val"]) and not (chars["train"] & chars["test"]) and not (chars["val"] & chars["test"])
    real = _real_root()
    if real is not None and (real / "splits" / "vinyals").is_dir():
        assert names == load_split_names("vinyals", real / "splits" / "vinyals")


# ----------------------------------------------------------------------------- the real data
def _real_root() -> Path | None:
    if os.environ.get("FEWSHOT_TESTS_WITHOUT_DATA", "") not in ("", "0"):  # as conftest.real_data_root
        return None
    env = os.environ.get("FEWSHOT_DATA")
    candidates = ([Path(env) / "omniglot"] if env else []) + [
        (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "omniglot").resolve()]
    for cand in candidates:
        if (cand / "images_background.zip").exists() or (cand / "omniglot-py").exists() or (cand / "images_background").exists():
            return cand
    return None


@pytest.fixture(scope="session")
def real_omniglot(tmp_path_factory):
    """The full data set, decoded once per session into a temporary cache; returns (root, cache, dataset, seconds)."""
    root = _real_root()
    if root is None:
        pytest.skip("no real Omniglot: put it in ../shared/data/omniglot (next to the repo) or $FEWSHOT_DATA/omniglot")
    cache = tmp_path_factory.mktemp("fewshot_cache")
    t0 = time.perf_counter()
    ds = Omniglot(root=str(root), cache_dir=cache)
    return root, cache, ds, time.perf_counter() - t0


def test_real_omniglot_vinyals_split(real_omniglot, record_property):
    root, _, ds, seconds = real_omniglot
    record_property("decode_seconds", round(seconds, 2))
    print(f"\nfull Omniglot decode + cache write: {seconds:.1f} s")
    assert {s: ds.split(s).n_classes for s in ("train", "val", "test", "trainval")} == {
        "train": 4112, "val": 688, "test": 1692, "trainval": 4800}
    for s in ("train", "val", "test"):
        split = ds.split(s)
        assert split.x_shape == (1, 28, 28) and split.images.dtype == torch.uint8
        assert split.min_per_class == 20 and int(split.counts.max()) == 20
    names = {s: set(ds.split(s).class_names) for s in ("train", "val", "test")}
    chars = {s: {n.rsplit("/", 1)[0] for n in v} for s, v in names.items()}
    assert not (chars["train"] & chars["val"] or chars["train"] & chars["test"] or chars["val"] & chars["test"])


def test_real_omniglot_maml_split(real_omniglot):
    """The MAML paper's protocol on the real data: 1,100 / 100 / 423 characters (x4 rotations), disjoint,
    covering all 1,623; test characters come from alphabets seen in training."""
    root, cache, _, _ = real_omniglot
    ds = Omniglot(root=str(root), cache_dir=cache, split_scheme="maml")  # the decoded images come from the cache
    assert {s: ds.split(s).n_classes for s in ("train", "val", "test", "trainval")} == {
        "train": 4400, "val": 400, "test": 1692, "trainval": 4800}
    chars = {s: {n.rsplit("/", 1)[0] for n in ds.split(s).class_names} for s in ("train", "val", "test")}
    assert not (chars["train"] & chars["val"] or chars["train"] & chars["test"] or chars["val"] & chars["test"])
    assert len(set().union(*chars.values())) == 1623
    alphabets = {s: {c.split("/")[0] for c in v} for s, v in chars.items()}
    assert len(alphabets["test"] - alphabets["train"]) < len(alphabets["test"]) // 4


def test_real_omniglot_images_are_bright_strokes_on_black(real_omniglot):
    _, _, ds, _ = real_omniglot
    x = ds.split("test").images
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
    assert border.float().mean() < 2  # background near 0
    assert (x == 0).float().mean() > 0.6  # mostly background
    per_image_max = x.flatten(1).amax(1)
    assert (per_image_max > 200).float().mean() > 0.99  # every drawing has bright strokes


def test_real_omniglot_rotations_of_a_character_differ(real_omniglot):
    _, _, ds, _ = real_omniglot
    tr = ds.split("train")
    assert tr.class_names[:4] == [f"Angelic/character01/{r}" for r in ROTS]
    x = tr.images.view(tr.n_classes, 20, 28, 28)
    for k in (1, 2, 3):
        assert not torch.equal(x[0], x[k])
        assert torch.equal(x[k], torch.rot90(x[0], k, dims=(-2, -1)))


def test_real_omniglot_second_load_reads_the_cache_fast(real_omniglot, monkeypatch, record_property):
    root, cache, first, _ = real_omniglot
    monkeypatch.setattr(om, "decode_all", lambda *a, **k: pytest.fail("decoded again instead of reading the cache"))
    t0 = time.perf_counter()
    again = Omniglot(root=str(root), cache_dir=cache)
    seconds = time.perf_counter() - t0
    record_property("cached_load_seconds", round(seconds, 2))
    print(f"\ncached Omniglot load: {seconds:.2f} s")
    assert torch.equal(again.split("val").images, first.split("val").images)
    assert seconds < 10


def test_real_omniglot_from_the_lazy_store_gives_the_same_images_and_episodes(real_omniglot, tmp_path):
    """The store for data that does not fit in memory, on the real test split: same images, and the
    same 20-way episodes from the sampler and from the prefetching loader with 2 workers."""
    from fewshot_runner.data.loader import PrefetchingLoader
    from fewshot_runner.data.sampler import EpisodeSampler
    from fewshot_runner.data.store import store_split

    test = real_omniglot[2].split("test")
    lazy = store_split(test, tmp_path / "omniglot_test.store")
    assert lazy.class_names == test.class_names and torch.equal(lazy.images.tensor(), test.images)
    plain = EpisodeSampler(test, 20, 1, 5, seed=0)
    ref = [plain.sample(50) for _ in range(3)]
    with PrefetchingLoader(EpisodeSampler(lazy, 20, 1, 5, seed=0), num_workers=2) as loader:
        got = [loader.sample(50) for _ in range(3)]
    for a, b in zip(ref, got):
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
        assert torch.equal(a.query_y, b.query_y)
