"""Security rules, each against a crafted malicious file: checkpoints load with
weights_only=True and name no foreign classes; dataset archives are never extracted outside
their folder and caches are never unpickled; the Comet API key is written nowhere."""

from __future__ import annotations

import io
import json
import os
import pickle
import stat
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import one_error_line, run_cli
from fewshot_runner.data import omniglot as om
from fewshot_runner.engine import checkpoint as ckpt
from fewshot_runner.errors import CheckpointError, DataError


class _WritesMarker:
    """Unpickling this runs code: it creates the file ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _plain_checkpoint(**over) -> dict:
    state = {"format": ckpt.FORMAT, "step": 1, "model": {"w": torch.zeros(2)},
             "config": {"data": {"_target_": "fewshot_runner.data.synthetic.Synthetic", "n_way": 5},
                        "backbone": {"_target_": "fewshot_runner.backbones.mlp.MLP", "hidden": [4]},
                        "algo": {"_target_": "fewshot_runner.algorithms.protonet.PrototypicalNetworks"}}}
    state.update(over)
    return state


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("how", ["torch.save", "raw pickle", "torch.save, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
def test_checkpoint_with_pickled_code_is_refused_and_never_run(tmp_path, monkeypatch, how):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    payload = _plain_checkpoint(extra=_WritesMarker(marker))
    if how == "raw pickle":
        evil.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, evil)
    if "FORCE" in how:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="pickled objects other than tensors.*refused for safety"):
        ckpt.load_checkpoint(evil)
    assert not marker.exists()


def test_checkpoint_naming_a_foreign_class_is_refused(tmp_path):
    """Plain data can still name code: `fewshot eval` instantiates the saved config's
    `_target_`s, so only fewshot_runner's data/backbones/algorithms are accepted, at their place."""
    marker = tmp_path / "PWNED"
    cases = {
        "os.system": {"_target_": "os.system", "command": f"touch {marker}"},
        "nested": {"_target_": "fewshot_runner.data.synthetic.Synthetic",
                   "seed": {"_target_": "os.system", "command": f"touch {marker}"}},
        "private": {"_target_": "fewshot_runner.data.omniglot._download", "root": str(tmp_path)},
        "wrong place": {"_target_": "fewshot_runner.algorithms.maml.MAML"},
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.pt"
        state = _plain_checkpoint()
        state["config"]["data"] = data
        torch.save(state, path)
        state = ckpt.load_checkpoint(path)  # plain data: loads (resuming never instantiates it)
        with pytest.raises(CheckpointError, match="foreign class .* refused for safety"):
            ckpt.check_targets(state, path)
    # through the CLI and in-process: one line, and nothing ran
    p = run_cli(["eval", f"checkpoint={tmp_path / 'os.system.pt'}", "device=cpu",
                 f"hydra.run.dir={tmp_path / 'ev'}"], tmp_path)
    one_error_line(p, "foreign class", "os.system")
    from omegaconf import OmegaConf

    from fewshot_runner.engine.eval_checkpoint import evaluate_checkpoint

    cfg = OmegaConf.create({"checkpoint": str(tmp_path / "nested.pt")})
    with pytest.raises(CheckpointError, match="foreign class"):
        evaluate_checkpoint(cfg, run_dir=tmp_path / "ev2")
    assert not marker.exists()


def test_checkpoint_config_must_be_plain_data(tmp_path):
    bad = _plain_checkpoint()
    bad["config"]["algo"]["inner_lr"] = torch.tensor(0.5)  # loads with weights_only, but is not plain data
    torch.save(bad, tmp_path / "tensor_in_config.pt")
    with pytest.raises(CheckpointError, match="no plain-data run config"):
        ckpt.load_checkpoint(tmp_path / "tensor_in_config.pt")
    torch.save(_plain_checkpoint(model={"w": [1.0, 2.0]}), tmp_path / "no_tensors.pt")
    with pytest.raises(CheckpointError, match="no model weights"):
        ckpt.load_checkpoint(tmp_path / "no_tensors.pt")


def test_written_checkpoints_hold_only_tensors_and_plain_data(compose_cfg, tmp_path):
    from fewshot_runner.engine.run import train

    train(compose_cfg(["debug=smoke", "algo=protonet", "backbone.hidden=4", "train.steps=2", "device.threads=1",
                       "eval.n_episodes=4"]), run_dir=tmp_path)
    for name in ("last.pt", "best.pt"):
        state = ckpt.load_checkpoint(tmp_path / "checkpoints" / name)  # weights_only=True

        def walk(x, where):
            if isinstance(x, dict):
                for k, v in x.items():
                    assert isinstance(k, (str, int)), where
                    walk(v, f"{where}.{k}")
            elif isinstance(x, (list, tuple)):
                for i, v in enumerate(x):
                    walk(v, f"{where}[{i}]")
            else:
                assert isinstance(x, (torch.Tensor, str, int, float, bool, type(None))), (where, type(x))

        walk(state, name)
        assert ckpt._is_plain(state["config"]) and "api_key" not in json.dumps(state["config"]).lower()


# ----------------------------------------------------------------------------- dataset archives
CHARS = {"images_background": ["Alpha/character01", "Alpha/character02"], "images_evaluation": ["Gamma/character01"]}


def _png(seed: int) -> bytes:
    im = Image.new("1", (20, 20), 1)
    im.putpixel((seed % 20, (3 * seed) % 20), 0)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _write_omniglot(root: Path, extra: dict[str, list[tuple[str | zipfile.ZipInfo, bytes]]] | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for set_name, chars in CHARS.items():
        with zipfile.ZipFile(root / f"{set_name}.zip", "w") as zf:
            for c, char in enumerate(chars):
                for i in range(2):
                    zf.writestr(f"{set_name}/{char}/{c:04d}_{i:02d}.png", _png(7 * c + i))
            for name, data in (extra or {}).get(set_name, []):
                zf.writestr(name if isinstance(name, zipfile.ZipInfo) else zipfile.ZipInfo(name), data)


def _split_dir(tmp_path: Path) -> Path:
    d = tmp_path / "splits"
    d.mkdir(exist_ok=True)
    names = {"train": ["Alpha/character01/rot000"], "val": ["Alpha/character02/rot000"],
             "test": ["Gamma/character01/rot000"]}
    for split, lines in names.items():
        (d / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return d


def _files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("member", ["/tmp/fewshot_evil_abs.png", "images_background/../../evil.png",
                                    "images_background/Alpha/character01/../../../../evil.png",
                                    "..\\..\\evil.png"])
def test_archive_with_absolute_or_dotdot_member_is_refused(tmp_path, member):
    root = tmp_path / "data" / "omniglot"
    _write_omniglot(root, {"images_background": [(member, _png(1))]})
    before = _files_under(tmp_path)
    with pytest.raises(DataError, match="unsafe member name"):
        om.Omniglot(str(root), split_dir=_split_dir(tmp_path), cache_dir=tmp_path / "cache", workers=1)
    assert _files_under(tmp_path) - before <= {"splits", "splits/train.txt", "splits/val.txt", "splits/test.txt"}
    assert not Path("/tmp/fewshot_evil_abs.png").exists() and not (tmp_path / "evil.png").exists()


def test_archive_symlink_member_is_not_followed(tmp_path):
    """A zip symlink member pointing at an image outside the folder: the archive is read in
    place, so the link is never created nor followed; its bytes (the link text) are no PNG,
    and the load stops with one clear line."""
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png(3))
    link = zipfile.ZipInfo("images_background/Alpha/character01/0000_99.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    root = tmp_path / "data" / "omniglot"
    _write_omniglot(root, {"images_background": [(link, str(outside).encode())]})
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(DataError) as err:
        om.Omniglot(str(root), split_dir=_split_dir(tmp_path), cache_dir=tmp_path / "cache", workers=1)
    assert "\n" not in str(err.value)
    assert not any(p.is_symlink() for p in tmp_path.rglob("*"))
    assert sorted(p.name for p in root.iterdir()) == ["images_background.zip", "images_evaluation.zip"]
    assert all(p.stat().st_mtime_ns == m for p, m in before.items())


def test_malicious_cache_file_is_not_unpickled_and_is_rebuilt(tmp_path):
    root = tmp_path / "data" / "omniglot"
    _write_omniglot(root)
    splits, cache = _split_dir(tmp_path), tmp_path / "cache"
    path = om.cache_path(root.absolute(), 28, cache)
    path.parent.mkdir(parents=True)
    marker = tmp_path / "PWNED"
    torch.save({"format": "fewshot_runner.omniglot", "images": _WritesMarker(marker)}, path)
    with pytest.warns(UserWarning, match="cache .* is corrupt"):
        ds = om.Omniglot(str(root), split_dir=splits, cache_dir=cache, workers=1)
    assert not marker.exists()
    assert ds.split("train").n_classes == 1
    assert torch.load(path, weights_only=True)["format"] == "fewshot_runner.omniglot"  # rebuilt, plain


# ----------------------------------------------------------------------------- the Comet API key
class _RejectsEveryKey(BaseHTTPRequestHandler):
    """A Comet server stand-in that answers every request with 401 Invalid apiKey."""

    def _reply(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        body = b'{"msg": "Invalid apiKey", "code": 401, "data": null, "sdk_error_code": 90212}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _reply

    def log_message(self, *args):
        pass


def test_comet_key_is_never_written_and_a_wrong_key_falls_back_offline(tmp_path):
    server = HTTPServer(("127.0.0.1", 0), _RejectsEveryKey)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    key = "SecretKey9f8e7d6c5b4a"
    run = tmp_path / "run"
    try:
        p = run_cli(["train", "debug=smoke", "algo=protonet", "backbone.hidden=4", "device.threads=1",
                     "logger=comet", "logger.tags=[t1]", f"hydra.run.dir={run}"], tmp_path,
                    env_extra={"COMET_API_KEY": key, "FEWSHOT_FAULT": "", "COMET_ERROR_TRACKING_ENABLE": "false",
                               "COMET_URL_OVERRIDE": f"http://127.0.0.1:{server.server_port}/clientlib/"})
    finally:
        server.shutdown()
    assert p.returncode == 0, p.stderr
    assert "Comet online logging failed" in p.stdout and "logged offline to" in p.stdout
    assert key not in p.stdout + p.stderr
    zips = list((run / "comet").glob("*.zip"))
    assert len(zips) == 1
    files = [f for f in run.rglob("*") if f.is_file()]
    assert {"config.yaml", "metrics.jsonl", "results.json"} <= {f.name for f in files}
    assert {".hydra/config.yaml", ".hydra/overrides.yaml"} <= {str(f.relative_to(run)) for f in files}
    for f in files:
        blobs = [f.read_bytes()]
        if f.suffix == ".zip":
            with zipfile.ZipFile(f) as zf:
                blobs += [zf.read(n) for n in zf.namelist()]
            assert any(b"train.outer_lr" in b for b in blobs)  # the parameters are in the archive
        for b in blobs:
            assert key.encode() not in b, f
