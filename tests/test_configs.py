"""Every config file of every group composes, and what it names instantiates."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from fewshot_runner.cli import conf_dir
from fewshot_runner.engine.device import resolve_runtime
from fewshot_runner.engine.build import build_dataset, build_learner, episode_shapes
from tiny_copies import config_overrides

CONF = Path(conf_dir())
GROUP_FILES = sorted((p.parent.name, p.stem) for p in CONF.glob("*/*.yaml"))


def test_all_groups_present():
    groups = {g for g, _ in GROUP_FILES}
    assert {"algo", "data", "backbone", "device", "logger", "debug", "experiment"} <= groups


OMNIGLOT = "fewshot_runner.data.omniglot.Omniglot"
TINY_COPIES = ("miniimagenet", "tieredimagenet", "cifar_fs", "fc100", "cub", "image_folder")  # files, no copy here
EXPERIMENTS = [n for g, n in GROUP_FILES if g == "experiment"]


def _selectors() -> dict[str, str]:
    """group -> how the command line selects one of its files where train.yaml's defaults list places the
    group at another package (``optional paper_net@backbone: ...``: ``paper_net@backbone=NAME``)."""
    from omegaconf import OmegaConf

    out = {}
    for entry in OmegaConf.load(CONF / "train.yaml").defaults:
        for key in (entry.keys() if hasattr(entry, "keys") else ()):
            key = str(key).removeprefix("optional ").strip()
            if "@" in key and not key.startswith("override "):
                out[key.split("@")[0]] = key
    return out


SELECTORS = _selectors()


def _own_protocol(name: str) -> bool:
    """An experiment preset that sets its data set's own protocol (Omniglot's split scheme, within-alphabet
    episodes): keys no other data set has, so it composes with its own data only."""
    from omegaconf import OmegaConf

    data = OmegaConf.load(CONF / "experiment" / f"{name}.yaml").get("data") or {}
    return bool({"split_scheme", "within_alphabet"} & set(data))


OWN_PROTOCOL = {n for n in EXPERIMENTS if _own_protocol(n)}


@pytest.mark.parametrize("group,name", GROUP_FILES, ids=[f"{g}={n}" for g, n in GROUP_FILES])
def test_config_composes_and_instantiates(compose_cfg, group, name, request, monkeypatch, tmp_path):
    """Each file with synthetic data (generated: no files needed) unless the data file is the point (or the
    experiment preset sets its data set's own protocol, OWN_PROTOCOL);
    data=omniglot reads the real copy (and skips without one), the published image data sets and
    image_folder a tiny copy in their format written here (tests/tiny_copies.py).  The experiment presets'
    own Omniglot data: test_experiment_presets_instantiate_with_their_omniglot_data."""
    overrides = [f"{SELECTORS.get(group, group)}={name}"]
    if group in ("paper", "paper_net"):  # ALGO_DATA[_BACKBONE]: with its algorithm (its keys are that algorithm's)
        algos = [p.stem for p in (CONF / "algo").glob("*.yaml") if name.startswith(p.stem + "_")]
        overrides.append(f"algo={max(algos, key=len)}")
    if group != "data" and not (group == "experiment" and name in OWN_PROTOCOL):
        overrides.append("data=synthetic")
    elif name in TINY_COPIES:
        overrides += config_overrides(name, tmp_path)
    elif name == "sinusoid":  # 1-d inputs: the paper's MLP (a conv net is refused in one line)
        overrides.append("backbone=mlp_sinusoid")
    cfg = compose_cfg(overrides)
    if cfg.data._target_ == OMNIGLOT:
        monkeypatch.setenv("FEWSHOT_DATA", str(request.getfixturevalue("omniglot_root")))
    instantiates(cfg)


SINUSOID = "fewshot_runner.data.sinusoid.Sinusoid"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_presets_instantiate_with_their_own_data(compose_cfg, name, omniglot_root, monkeypatch):
    """A preset as written: its data is Omniglot, read from the real copy (the sinusoid presets: generated)."""
    monkeypatch.setenv("FEWSHOT_DATA", str(omniglot_root))
    cfg = compose_cfg([f"experiment={name}"])
    assert cfg.data._target_ == (SINUSOID if name.endswith("_sinusoid") else OMNIGLOT)
    instantiates(cfg)


def instantiates(cfg) -> None:
    """The config's runtime (on CPU), data set and learner build; the test split holds an episode's classes."""
    cpu = cfg.device.copy()
    cpu.type = "cpu"
    runtime = resolve_runtime(cpu)
    dataset = build_dataset(cfg.data)
    tr, ev = episode_shapes(cfg.data)
    algo = build_learner(cfg, dataset.x_shape, tr.n_way, runtime)
    assert sum(p.numel() for p in algo.parameters()) > 0
    assert dataset.split("test").n_classes >= ev.n_way


def test_eval_config_composes(compose_cfg):
    cfg = compose_cfg(["checkpoint=/x.pt", "data.n_way=20"], name="eval")
    assert cfg.data.n_way == 20 and cfg.eval.n_episodes == 600


def test_schema_rejects_wrong_type_and_unknown_key(compose_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_cfg(["algo.inner_lr=abc"])
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["algo.inner_lrr=0.1"])


def test_published_defaults(compose_cfg):
    maml = compose_cfg(["algo=maml"])
    assert (maml.algo.inner_lr, maml.algo.inner_steps, maml.algo.first_order, maml.train.meta_batch_size) == (0.4, 1, False, 32)
    assert compose_cfg(["algo=fomaml"]).algo.first_order is True
    proto = compose_cfg(["algo=protonet"])
    assert proto.train.meta_batch_size == 1 and proto.train.outer_lr == 1e-3
    fast = compose_cfg(["experiment=protonet_omniglot_10min"])  # the README's under-10-minutes ProtoNet row
    assert (fast.algo._target_.endswith("PrototypicalNetworks"), fast.data.train_n_way, fast.data.train_n_query,
            fast.train.split, fast.train.steps, fast.train.lr_decay_every, fast.device.precision) == (
        True, 100, 5, "trainval", 6500, 2000, "auto")
    fp32 = compose_cfg(["experiment=protonet_omniglot_10min_fp32"])  # the README's fp32 10-minute row
    assert (fp32.algo.rotate_support, fp32.data.train_n_way, fp32.data.train_n_query, fp32.train.split,
            fp32.train.steps, fp32.train.outer_lr, fp32.train.lr_decay_every, fp32.device.precision) == (
        True, 100, 5, "trainval", 1650, 2e-3, 525, "fp32")
    assert fast.algo.rotate_support is False
    logger = compose_cfg([])
    assert "api_key" not in str(logger.logger).lower()


@pytest.mark.parametrize("amx, avx512_bf16, ratio, expected", [
    (True, True, 0.5, "bf16"),  # AMX: bf16 without a probe
    (False, False, 9.0, "fp32"),  # no bf16 instructions: never bf16, whatever a probe would say
    (False, True, 1.39, "bf16"),  # AVX-512-BF16 without AMX: the probe decides (an AMD Zen 4)
    (False, True, 0.71, "fp32"),  # (an Intel Xeon)
])
def test_precision_auto_is_bf16_only_where_the_cpu_runs_it_faster(compose_cfg, monkeypatch, amx, avx512_bf16, ratio,
                                                                  expected):
    import fewshot_runner.engine.device as device_mod

    monkeypatch.setattr(device_mod, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(device_mod, "cpu_has_avx512_bf16", lambda: avx512_bf16)
    monkeypatch.setattr(device_mod, "bf16_conv_speedup", lambda: ratio)
    rt = resolve_runtime(compose_cfg(["data=synthetic", "device=cpu", "device.precision=auto"]).device)
    assert rt.precision == expected
    assert rt.autocast_dtype == (torch.bfloat16 if expected == "bf16" else None)
    assert rt.precision_note.startswith(expected)
    fixed = resolve_runtime(compose_cfg(["data=synthetic", "device=cpu", "device.precision=fp32"]).device)
    assert fixed.autocast_dtype is None and fixed.precision_note == ""  # the default stays exact whatever the CPU


def test_bf16_conv_probe_times_both_precisions():
    from fewshot_runner.engine.device import bf16_conv_speedup

    ratio = bf16_conv_speedup.__wrapped__(reps=1)  # uncached: the real convolutions, once each
    assert 0.01 < ratio < 100


def test_cpu_has_amx_agrees_with_the_cpu_flags():
    from fewshot_runner.engine.device import cpu_has_amx, cpu_has_avx512_bf16

    info = Path("/proc/cpuinfo")
    if info.exists():
        assert cpu_has_amx() == (" amx_tile" in info.read_text())
        assert cpu_has_avx512_bf16() == (" avx512_bf16" in info.read_text())


@pytest.mark.parametrize("value,expected", [("auto", True), ("on", True), ("true", True), ("off", False),
                                            ("false", False)])
def test_channels_last_switch(compose_cfg, value, expected):
    """device.channels_last: auto is on for CPU (measured faster there, docs/speed.md); booleans accepted."""
    cfg = compose_cfg(["data=synthetic", "device=cpu", f"device.channels_last={value}"])
    runtime = resolve_runtime(cfg.device)
    assert runtime.channels_last is expected
    algo = build_learner(cfg, (1, 28, 28), 5, runtime)
    blocks = [m for m in algo.modules() if hasattr(m, "channels_last")]
    assert blocks and all(m.channels_last is expected for m in blocks)


def test_channels_last_bad_value_is_one_clear_error(compose_cfg):
    from fewshot_runner.errors import UserError

    cfg = compose_cfg(["data=synthetic", "device=cpu", "device.channels_last=sometimes"])
    with pytest.raises(UserError, match="device.channels_last='sometimes' is not one of off, on, auto"):
        resolve_runtime(cfg.device)
