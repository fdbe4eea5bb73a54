"""Dataclass schemas for every config group, registered in Hydra's ConfigStore.

YAML files in ``conf/`` extend these schemas (``defaults: [/schema/<group>/<name>]``), so a
misspelt key or a wrong type in an override fails at composition with the key's name.
Importing this module must stay cheap: no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


# ----------------------------------------------------------------------------- data
@dataclass
class NormalizeConfig:
    mean: list[float] = field(default_factory=list)  # one per channel
    std: list[float] = field(default_factory=list)


@dataclass
class AugmentConfig:
    """Training-only augmentation (never at validation, test or `fewshot eval`)."""

    crop_padding: int = 0  # random crop of the image size after zero padding by this many pixels (0: off)
    flip: bool = False  # random horizontal flip
    color_jitter: float = 0.0  # brightness / contrast / saturation jitter strength (0: off)


@dataclass
class DataConfig:
    """Episode shape plus the data set's own keys. ``n_way/n_shot/n_query`` shape the
    validation and test episodes and, unless ``train_*`` says otherwise, training ones."""

    _target_: str = MISSING
    n_way: int = 5  # classes per validation/test episode (and training, unless train_n_way)
    n_shot: int = 1  # labelled support images per class
    n_query: int = 15  # query images per class, to classify
    train_n_way: Optional[int] = None  # e.g. 60 for ProtoNet's higher-way training
    train_n_shot: Optional[int] = None  # null: n_shot
    train_n_query: Optional[int] = None  # null: n_query (MAML on Omniglot: 1, as the paper's code)
    # the data layer's transform hook (data/transforms.py), on the device after uint8 -> float:
    # per-channel normalisation (data.normalize.mean=[...] data.normalize.std=[...]; empty: none) and
    # training-only augmentation
    normalize: NormalizeConfig = field(default_factory=lambda: NormalizeConfig())  # empty mean/std: none
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig())
    # DataLoader worker processes that gather training batches ahead (0: none); the batches are the same,
    # for data read lazily from disk (data/store.py, data/loader.py)
    workers: int = 0


@dataclass
class OmniglotConfig(DataConfig):
    _target_: str = "fewshot_runner.data.omniglot.Omniglot"
    root: Optional[str] = None  # None: $FEWSHOT_DATA/omniglot, else ~/.cache/fewshot/omniglot
    download: bool = False  # true: fetch with torchvision when the data is missing (needs internet)
    image_size: int = 28  # pixels per side, after resizing from 105
    # vinyals: the Vinyals et al. split (whole alphabets held out; ProtoNet, Matching Nets); maml: the
    # MAML paper's random split of all characters (1,100 / 100 / 423; test alphabets seen in training)
    split_scheme: str = "vinyals"


@dataclass
class SyntheticConfig(DataConfig):
    _target_: str = "fewshot_runner.data.synthetic.Synthetic"
    n_classes_train: int = 64  # generated classes per split
    n_classes_val: int = 16
    n_classes_test: int = 20
    per_class: int = 20  # images per class
    image_size: int = 28  # pixels per side
    channels: int = 1  # image channels
    seed: int = 0  # the classes depend on this seed only


# ----------------------------------------------------------------------------- backbones
@dataclass
class Conv4Config:
    _target_: str = "fewshot_runner.backbones.conv.Conv4"
    hidden: int = 64  # channels of each of the four conv blocks
    pool: bool = True  # max-pool (ProtoNet / MAML miniImageNet) or stride-2 convs (MAML Omniglot)
    fused_ops: str = "${device.fused_ops}"  # off | on | auto


@dataclass
class MLPConfig:
    _target_: str = "fewshot_runner.backbones.mlp.MLP"
    hidden: list[int] = field(default_factory=lambda: [256, 128, 64, 64])  # widths of the hidden layers
    batch_norm: bool = True  # BatchNorm after each hidden layer


# ----------------------------------------------------------------------------- algorithms
@dataclass
class MAMLConfig:
    _target_: str = "fewshot_runner.algorithms.maml.MAML"
    inner_lr: float = 0.4  # learning rate of the inner (adaptation) steps
    inner_steps: int = 1  # adaptation steps per task in training
    eval_inner_steps: int = 3  # adaptation steps at validation and test
    first_order: bool = False  # true: FOMAML (no second-order term)
    batch_tasks: str = "${device.batch_tasks}"  # off | on (vmap) | groups (grouped convolutions) | auto


@dataclass
class MetaSGDConfig:
    _target_: str = "fewshot_runner.algorithms.metasgd.MetaSGD"
    # the learned inner rates (one per weight, each parameter's shape) start at this value everywhere
    inner_lr_init: float = 0.4
    # set: the rates start uniform in [inner_lr_init, inner_lr_init_max] (the paper: U[0.005, 0.1]); null: constant
    inner_lr_init_max: Optional[float] = None
    inner_steps: int = 1  # adaptation steps per task in training (the paper: 1)
    eval_inner_steps: int = 1  # adaptation steps at validation and test, with the learned rates
    first_order: bool = False  # true: no second-order term (the rates still get a gradient)
    rates_lr: Optional[float] = None  # outer learning rate of the rates; null: train.outer_lr, as the weights
    batch_tasks: str = "${device.batch_tasks}"  # off | on (vmap) | groups (grouped convolutions) | auto


@dataclass
class ANILConfig:
    _target_: str = "fewshot_runner.algorithms.anil.ANIL"
    inner_lr: float = 0.4  # learning rate of the inner steps, which adapt the linear head only
    inner_steps: int = 1  # adaptation steps per task in training
    eval_inner_steps: int = 3  # adaptation steps at validation and test
    first_order: bool = False  # true: no second-order term
    batch_tasks: str = "${device.batch_tasks}"  # off | on (vmap) | groups (grouped convolutions) | auto


@dataclass
class ReptileConfig:
    _target_: str = "fewshot_runner.algorithms.reptile.Reptile"
    inner_lr: float = 0.1  # SGD learning rate of the inner steps (training and test time)
    inner_steps: int = 5  # SGD steps per training task, on its support + query images
    inner_batch: Optional[int] = 10  # images per training inner step (a random walk through the task); null: all
    eval_inner_steps: int = 50  # fine-tuning steps on the support set at validation and test
    outer_step_size: float = 1.0  # eps in theta += eps * mean(phi - theta) at the first step ...
    outer_step_size_final: float = 0.0  # ... annealed linearly to this at train.steps
    # batch norm at test time: true normalises a task's queries together (the paper's reported setting);
    # false scores each query image with the support set alone
    transductive: bool = False
    batch_tasks: str = "${device.batch_tasks}"  # training: groups (grouped convolutions) or auto; else task by task


@dataclass
class ProtoNetConfig:
    _target_: str = "fewshot_runner.algorithms.protonet.PrototypicalNetworks"
    # training only: average the episode loss over the rotations of each class's shot + query images
    # between support and query (each image is the support once per n_shot), from the same embeddings
    rotate_support: bool = False


# ----------------------------------------------------------------------------- optimizers
# The outer optimizer (``optimizer=adam|sgd|adamw``); its learning rate is train.outer_lr, its parameter
# groups the learner's param_groups().
@dataclass
class AdamConfig:
    _target_: str = "torch.optim.Adam"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False


@dataclass
class AdamWConfig:
    _target_: str = "torch.optim.AdamW"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01


@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0


# ----------------------------------------------------------------------------- run level
@dataclass
class DeviceConfig:
    type: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast; opt-in, not exact) | auto (bf16 on a CPU with AMX, else fp32)
    fused_ops: str = "auto"  # fused BN+ReLU+max-pool kernels: off | on | auto
    batch_tasks: str = "auto"  # MAML: tasks of a batch at once: off | on (vmap) | groups (grouped convs, Conv4) | auto
    channels_last: str = "auto"  # NHWC convolutions: off | on | auto (on for CPU; true/false also accepted)
    task_threads: str = "auto"  # MAML on CPU: tasks of a batch in N threads of 1 core each; auto | N
    compile: bool = False  # torch.compile the backbone (ProtoNet; refused for MAML's double backward)
    # the training step's forward and backward captured once as a CUDA graph and replayed: off | on | auto (off
    # until measured on a GPU)
    cuda_graphs: str = "off"
    # MiB: split each meta-batch into the largest chunks of tasks whose forward/backward stays under it
    # (measured on the first step; CUDA: allocated memory, CPU: the autograd graph's saved tensors); null: no cap
    memory_cap_mb: Optional[float] = None
    threads: Optional[int] = None  # torch intra-op threads; None: torch's default
    tune_allocator: bool = True  # the launcher re-execs with glibc malloc thresholds set


@dataclass
class LoggerConfig:
    # auto (comet online if COMET_API_KEY is set, else offline) | comet | comet_offline | tensorboard | none,
    # or several joined by + (comet_offline+tensorboard); see fewshot_runner/loggers/__init__.py
    kind: str = "auto"
    project_name: Optional[str] = "fewshot-runner"  # Comet project
    workspace: Optional[str] = None  # Comet workspace; null: the key's default
    experiment_name: Optional[str] = None  # None: <algo>-<data>-<n_way>w<n_shot>s-seed<seed>
    tags: list[str] = field(default_factory=list)  # added to algorithm, dataset, shape and preset
    log_model: bool = False  # upload the best checkpoint to Comet as a model


@dataclass
class TrainLoopConfig:
    steps: int = 10000  # outer steps (ProtoNet: episodes)
    # classes to train on: train, or trainval (train + val, as the ProtoNet paper's 1,200 Omniglot
    # characters; there is then no held-out validation: the last model is kept and tested)
    split: str = "train"
    meta_batch_size: int = 32  # tasks per outer step
    outer_lr: float = 1e-3  # Adam
    lr_decay_every: Optional[int] = None  # StepLR: multiply the outer lr by lr_decay every N steps
    lr_decay: float = 0.5  # factor of the step schedule
    # step: the StepLR above (constant when lr_decay_every is null); cosine: anneal the outer lr
    # from outer_lr to outer_lr * lr_min over train.steps (lr_decay_every is then not used)
    lr_schedule: str = "step"
    lr_min: float = 0.0  # cosine: the last lr as a fraction of outer_lr
    grad_clip: Optional[float] = None  # max gradient norm; null: no clipping
    # exponential moving average of the weights (0: off): validation, the test and best.pt use the
    # average; training goes on with the model's own weights (engine/ema.py)
    ema_decay: float = 0.0
    task_chunk: Optional[int] = None  # tasks per forward/backward (bounds memory); None: all
    val_every: int = 500  # validate every N steps (keeps the best model)
    val_episodes: int = 200  # episodes per validation
    ckpt_every: int = 500  # write checkpoints/last.pt every N steps
    log_every: int = 10  # metrics every N steps
    on_nan: str = "stop"  # stop | skip
    progress: bool = True  # rich progress bar


@dataclass
class EvalConfig:
    n_episodes: int = 600  # test episodes (mean and 95 % interval)
    split: str = "test"  # train | val | test: the classes to test on
    seed: int = 2024  # fixes the validation/test episodes
    chunk: int = 50  # episodes per forward at most (speed and memory only: the episodes depend on seed alone)


@dataclass
class TrainConfig:
    seed: int = 0  # seeds the weights and the training episodes
    print_config: bool = False  # print the resolved config as a tree (each group's choice) before the run
    resume: Optional[str] = None  # PATH or "auto"
    data: Any = MISSING
    backbone: Any = MISSING
    algo: Any = MISSING
    optimizer: Any = MISSING
    device: DeviceConfig = field(default_factory=DeviceConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class EvalDataOverrides:
    """Episode shape and data location for ``fewshot eval``; None keeps the checkpoint's."""

    n_way: Optional[int] = None
    n_shot: Optional[int] = None
    n_query: Optional[int] = None
    root: Optional[str] = None


@dataclass
class EvalRunConfig:
    checkpoint: str = MISSING  # the .pt file of a trained run (e.g. outputs/DATE/TIME/checkpoints/best.pt)
    seed: int = 0  # not used by the evaluation: its episodes depend on eval.seed and the shape alone
    data: EvalDataOverrides = field(default_factory=EvalDataOverrides)
    # test-time settings of the checkpoint's learner (its eval_settings, e.g. MAML's eval_inner_steps and
    # inner_lr); any other key is refused in one line naming those the learner allows
    algo: dict[str, Any] = field(default_factory=dict)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(kind="none"))
    eval: EvalConfig = field(default_factory=EvalConfig)


def conf_dir() -> str:
    """The conf/ folder: beside src/ in a checkout, or packaged as fewshot_runner/conf."""
    here = Path(__file__).resolve().parent  # src/fewshot_runner
    for cand in (here.parents[1] / "conf", here / "conf"):
        if (cand / "train.yaml").exists():
            return str(cand)
    raise RuntimeError("fewshot_runner's conf/ folder is missing from this installation")


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalRunConfig)
    for group, name, node in [
        ("data", "omniglot", OmniglotConfig),
        ("data", "synthetic", SyntheticConfig),
        ("backbone", "conv4", Conv4Config),
        ("backbone", "mlp", MLPConfig),
        ("algo", "maml", MAMLConfig),
        ("algo", "protonet", ProtoNetConfig),
        ("algo", "metasgd", MetaSGDConfig),
        ("algo", "anil", ANILConfig),
        ("algo", "reptile", ReptileConfig),
        ("optimizer", "adam", AdamConfig),
        ("optimizer", "adamw", AdamWConfig),
        ("optimizer", "sgd", SGDConfig),
    ]:
        cs.store(group=f"schema/{group}", name=name, node=node, package=group)


register_configs()
