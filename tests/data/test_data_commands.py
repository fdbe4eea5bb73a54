"""`fewshot data check` / `fewshot data prepare` in a subprocess, on generated copies and on real Omniglot, and a
smoke training run on a tiny miniImageNet copy (results.json records the split's checksum)."""

from __future__ import annotations

import json

import pytest
from conftest import one_error_line, run_cli
from tiny_copies import tiny_names, write_class_folders, write_mini_pickles, write_split_dir

from fewshot_runner.data.published import split_checksum

NAMES = tiny_names("miniimagenet", 2)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    return write_mini_pickles(root / "data", NAMES), write_split_dir(root / "split", NAMES)


def test_check_reports_what_it_found_and_that_the_copy_is_usable(mini, tmp_path):
    data, split = mini
    p = run_cli(["data", "check", "data=miniimagenet", f"data.root={data}", f"data.split_dir={split}"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"miniImageNet: found under {data} (pickled caches):" in p.stdout
    assert str(data / "mini-imagenet-cache-val.pkl") in p.stdout
    assert f"train 2 classes / 6 images, val 2 classes / 6 images, test 2 classes / 6 images; checksum " \
           f"{split_checksum(NAMES)}" in p.stdout
    assert "not built yet" in p.stdout and p.stdout.rstrip().endswith("usable: yes")


def test_check_of_a_partial_copy_lists_what_is_missing_and_exits_non_zero(mini, tmp_path):
    data, _ = mini
    p = run_cli(["data", "check", "data=miniimagenet", f"data.root={data}"], tmp_path)  # the shipped 64/16/20 split
    one_error_line(p, "has no class", "of the train split (94 of 100 split classes missing)")
    assert "missing: class " in p.stdout and "to fix:  get mini-imagenet-cache-{train,val,test}.pkl" in p.stdout


def test_prepare_builds_the_store_which_check_then_finds(tmp_path):
    root = write_class_folders(tmp_path / "mine", [f"c{k}" for k in range(5)], per_class=2)
    args = ["data=image_folder", f"data.root={root}", "data.image_size=12"]
    p = run_cli(["data", "prepare", *args], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "images (3, 12, 12)" in p.stdout and (root / ".fewshot_cache" / "image_folder_3x12x12.store").is_file()
    p = run_cli(["data", "check", *args], tmp_path)
    assert p.returncode == 0 and "image_folder_3x12x12.store (present)" in p.stdout, p.stdout + p.stderr


def test_prepare_without_data_is_one_line_and_non_zero(tmp_path):
    p = run_cli(["data", "prepare", "data=cub", f"data.root={tmp_path / 'none'}"], tmp_path)
    one_error_line(p, "no CUB-200-2011 images under", "get CUB_200_2011.tgz")
    p = run_cli(["data", "check", "data=miniimagenet", "data.image_size=big"], tmp_path)
    one_error_line(p, "image_size")


def test_check_on_real_omniglot_loads_it(omniglot_root, tmp_path):
    p = run_cli(["data", "check", "data=omniglot"], tmp_path, env_extra={"FEWSHOT_DATA": str(omniglot_root)})
    assert p.returncode == 0, p.stderr
    assert "train  4112 classes    82240 images (20 to 20 per class)" in p.stdout
    assert "test   1692 classes    33840 images" in p.stdout and "split checksum " in p.stdout


@pytest.mark.slow
def test_protonet_trains_on_a_tiny_miniimagenet_copy_and_records_the_split_checksum(mini, tmp_path):
    data, split = mini
    p = run_cli(["train", "algo=protonet", "debug=smoke", "data=miniimagenet", f"data.root={data}",
                 f"data.split_dir={split}", "data.image_size=16", "data.n_way=2", "data.n_shot=1", "data.n_query=2",
                 "train.val_episodes=2", "eval.n_episodes=4", "eval.chunk=2", "device.threads=1",
                 f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["data/split_checksum"] == split_checksum(NAMES) and results["test/n_episodes"] == 4
