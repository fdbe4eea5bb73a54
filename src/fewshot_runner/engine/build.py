"""Building a run's parts from its config: data set, learner, optimizer, schedule, runtime, loggers.

Selection is only through ``_target_`` (Hydra ``instantiate``); nothing here knows any learner.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fewshot_runner.algorithms.base import MetaLearner
from fewshot_runner.data.base import EpisodicDataset
from fewshot_runner.engine.device import Runtime, resolve_runtime
from fewshot_runner.engine.messages import say
from fewshot_runner.errors import UserError

EPISODE_KEYS = ("n_way", "n_shot", "n_query", "train_n_way", "train_n_shot", "train_n_query")
TRANSFORM_KEYS = ("normalize", "augment")  # the data layer's transform hook (data/transforms.py)
LOADER_KEYS = ("workers",)  # the prefetching loader (data/loader.py)


class BackboneInputError(UserError, RuntimeError):
    """The backbone's trial forward failed on the data's input shape: one line for the CLI (a UserError), and
    still the RuntimeError that callers wording it for their own inputs catch (predict.py: the user's images)."""


def instantiate_node(node, **kwargs):
    """``hydra.utils.instantiate``, re-raising a UserError from the target as itself (Hydra
    wraps exceptions from targets in InstantiationException)."""
    try:
        return instantiate(node, **kwargs)
    except Exception as e:
        cause = e
        while cause is not None:
            if isinstance(cause, UserError):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        raise


def build_dataset(data_cfg) -> EpisodicDataset:
    """Instantiate the data set from its config, without the episode-shape and transform keys."""
    node = OmegaConf.to_container(data_cfg, resolve=True)
    for k in (*EPISODE_KEYS, *TRANSFORM_KEYS, *LOADER_KEYS):
        node.pop(k, None)
    return instantiate_node(node)


def build_transforms(data_cfg, channels: int | None = None):
    """(training transform, evaluation transform) of ``data.normalize`` / ``data.augment``: callables on
    float image batches, applied on the device after the uint8 -> float conversion; None where nothing
    is to be done (the default, and every checkpoint written before these keys)."""
    normalize, augment = data_cfg.get("normalize"), data_cfg.get("augment")
    if normalize is not None and not normalize.get("mean") and not normalize.get("std"):
        normalize = None  # (empty lists, the schema's default: no normalisation)
    if not normalize and not augment:
        return None, None
    from fewshot_runner.data.transforms import build_transforms as build

    plain = OmegaConf.to_container(OmegaConf.create({"n": normalize, "a": augment}), resolve=True)
    return build(plain["n"], plain["a"], channels=channels)  # (a mean/std of the wrong length: one line)


def prefetched(source, data_cfg, runtime: Runtime):
    """The learner's batch source, gathered ahead in ``data.workers`` DataLoader workers when set (the same
    batches, and the same checkpointed state: data/loader.py)."""
    workers = int(data_cfg.get("workers") or 0)
    if workers < 1:
        return source
    from fewshot_runner.data.loader import PrefetchingLoader

    return PrefetchingLoader(source, num_workers=workers, pin_memory=runtime.device.type == "cuda")


@dataclass
class Shape:
    n_way: int
    n_shot: int
    n_query: int


def episode_shapes(data_cfg) -> tuple[Shape, Shape]:
    """(train shape, evaluation shape)."""
    ev = Shape(data_cfg.n_way, data_cfg.n_shot, data_cfg.n_query)
    tr = Shape(data_cfg.get("train_n_way") or ev.n_way, data_cfg.get("train_n_shot") or ev.n_shot,
               data_cfg.get("train_n_query") or ev.n_query)
    return tr, ev


def build_learner(cfg, x_shape: tuple[int, ...], n_way: int, runtime: Runtime,
                  task_kind: str = "classification") -> MetaLearner:
    """The backbone, then the learner around it (``n_way``: the training shape's, for fixed heads), on the
    runtime's device and memory format; ``device.compile`` applied.  ``task_kind``: the data's
    (``split.task_kind``); a learner that cannot learn it is refused in one line, else told it
    (``set_task_kind``)."""
    check_task_kind(learner_class(cfg.algo), task_kind)
    backbone = instantiate_node(cfg.backbone, x_shape=tuple(x_shape))
    with torch.no_grad():
        was = backbone.training
        backbone.train()
        try:
            feature_dim = int(backbone(torch.zeros(2, *x_shape)).shape[-1])
        except RuntimeError as e:  # (a conv net given 1-d points, ...)
            raise BackboneInputError(
                f"backbone {type(backbone).__name__} cannot take this data set's inputs of shape {tuple(x_shape)} "
                f"({str(e).splitlines()[0][:100]}); choose a backbone that fits them (1-d inputs such as "
                f"data=sinusoid's: backbone=mlp_sinusoid or backbone=mlp)") from None
        backbone.train(was)
    algo = instantiate_node(cfg.algo, backbone=backbone, n_way=n_way, feature_dim=feature_dim)
    if not isinstance(algo, MetaLearner):
        raise UserError(f"algo._target_={cfg.algo._target_} is not a MetaLearner (fewshot_runner.algorithms.base); "
                        f"choose a learner with algo=NAME (`fewshot list`)")
    algo.set_task_kind(task_kind)
    check_backbone(type(algo), backbone)
    algo = algo.to(runtime.device)
    if runtime.channels_last:
        from fewshot_runner.backbones import use_channels_last

        algo = use_channels_last(algo)
    if runtime.compile:
        check_compile(type(algo))
        algo.compile_for_speed()
    return algo


def learner_class(algo_cfg) -> type:
    """The learner class an ``algo`` config names, without building it (not Hydra's get_class: it logs a
    multi-line error of its own before raising)."""
    import importlib

    module, _, name = str(algo_cfg._target_).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise UserError(f"algo._target_={algo_cfg._target_} cannot be imported (no such module or class); "
                        f"choose a learner with algo=NAME (`fewshot list`)") from None


def check_task_kind(learner_cls: type, task_kind: str) -> None:
    """A learner that cannot learn the data's task kind (its ``task_kinds``, algorithms/base.py) is refused
    in one line, before anything is built (a class that is not a MetaLearner is refused later)."""
    if not (isinstance(learner_cls, type) and issubclass(learner_cls, MetaLearner)):
        return
    if task_kind not in learner_cls.task_kinds:
        raise UserError(f"{learner_cls.__name__} cannot learn {task_kind} tasks (it learns "
                        f"{' and '.join(learner_cls.task_kinds)} tasks only); for this data set choose a learner "
                        f"that adapts by gradient steps (algo=maml, fomaml, metasgd, anil or reptile), or give it "
                        f"{learner_cls.task_kinds[0]} data")


def check_backbone(learner_cls: type[MetaLearner], backbone: torch.nn.Module) -> None:
    """A learner that compares feature maps needs a backbone that gives them (backbones/__init__.py)."""
    if learner_cls.feature_kind == "map" and not hasattr(backbone, "forward_map"):
        raise UserError(f"{learner_cls.__name__} compares feature maps, which {type(backbone).__name__} does not "
                        f"give (no forward_map); use a convolutional backbone, e.g. backbone=conv4")


def check_compile(learner_cls: type) -> None:
    """device.compile=true needs a learner that declares ``supports_compile`` (algorithms/base.py)."""
    if not getattr(learner_cls, "supports_compile", False):  # (a class that is not a MetaLearner: refused too)
        raise UserError(f"{learner_cls.__name__} does not support device.compile=true (torch.compile cannot "
                        f"differentiate through its inner loop); use device.compile=false")


def make_optimizer(cfg, algo: MetaLearner) -> torch.optim.Optimizer:
    """The ``optimizer`` group's optimizer (Adam when the config has none: checkpoints from before the
    group) over the learner's ``param_groups()``, at ``train.outer_lr``."""
    node = cfg.get("optimizer")
    node = OmegaConf.to_container(node, resolve=True) if node is not None else {"_target_": "torch.optim.Adam"}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in node.items() if k != "_target_"}
    factory = instantiate_node({"_target_": node["_target_"], "_partial_": True})
    return factory(algo.param_groups(), lr=cfg.train.outer_lr, **kwargs)  # (plain Python values, never OmegaConf's)


def make_scheduler(optimizer: torch.optim.Optimizer, train_cfg):
    """The outer learning-rate schedule of ``train.lr_schedule`` (None: a constant rate)."""
    if train_cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train_cfg.steps,
                                                          eta_min=train_cfg.outer_lr * train_cfg.lr_min)
    if train_cfg.lr_decay_every:
        return torch.optim.lr_scheduler.StepLR(optimizer, train_cfg.lr_decay_every, train_cfg.lr_decay)
    return None


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (a resume restores all three)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_runtime(device_cfg: DictConfig) -> Runtime:
    """The runtime of a train or eval run, saying what ``device.precision=auto`` chose."""
    runtime = resolve_runtime(device_cfg)
    if runtime.precision_note:
        say(f"device.precision=auto: {runtime.precision_note}")
    return runtime


def make_run_logger(cfg: DictConfig, run_dir: Path, truncate_after_step: int, job: str = "train", described=None):
    """The run's loggers from its ``logger`` group (train and eval alike), named and tagged from the run's
    config (``described``: the checkpoint's training config, for ``fewshot eval``), with the run info
    (host, versions, git, command line) logged at once (loggers/runinfo.py)."""
    from fewshot_runner.loggers import make_run_logger as make

    plain = lambda c: OmegaConf.to_container(c, resolve=True) if isinstance(c, DictConfig) else c  # noqa: E731
    return make(plain(cfg), run_dir, truncate_after_step=truncate_after_step, job=job,
                described=plain(described) if described is not None else None)


def close_logger(logger) -> list[str]:
    try:
        return logger.close()
    except Exception as e:  # noqa: BLE001 - closing must not hide the error that stopped the run
        return [f"warning: closing the loggers failed ({type(e).__name__}: {e})"]
