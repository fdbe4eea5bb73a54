"""The run-level config schemas (``train``, ``eval``, ``predict``, ``device``, ``logger``), and the ConfigStore
registration of these and of every group schema in :mod:`fewshot_runner.schemas`.

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

from fewshot_runner.schemas import all_schemas


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
    # the pictures at the end (curves.png of training; episode.png, embedding.png or regression.png of the test)
    # in the run dir and the logger
    pictures: bool = True


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
    """Episode shape, data location and test protocol for ``fewshot eval``; None keeps the checkpoint's."""

    # another data set to test on (cross-domain: a miniImageNet model on data=cub); `fewshot eval data=NAME`
    # sets it. The checkpoint's episode shape is kept unless data.n_way/n_shot/n_query say otherwise
    name: Optional[str] = None
    n_way: Optional[int] = None
    n_shot: Optional[int] = None
    n_query: Optional[int] = None
    root: Optional[str] = None
    split_scheme: Optional[str] = None  # Omniglot: the split to test on (vinyals | maml | lake)
    within_alphabet: Optional[bool] = None  # Omniglot: every test episode's classes from one alphabet


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


@dataclass
class PredictRunConfig:
    """``fewshot predict`` (conf/predict.yaml): classify the user's own images with a trained model."""

    checkpoint: str = MISSING  # the .pt file of a trained run (e.g. outputs/DATE/TIME/checkpoints/best.pt)
    # the labelled examples: one folder per class, support/<class_name>/<images>; 2 classes or more (a learner
    # with a fixed-size head, e.g. MAML, takes exactly its training n_way)
    support: str = MISSING
    query: str = MISSING  # a folder of the images to classify (any number, any size and mode)
    # the CSV to write (file, predicted_class, probability, one probability column per class); null:
    # predictions.csv in the run dir (hydra.run.dir), beside the picture predictions.png
    out: Optional[str] = None
    # resize the images to this side instead of the checkpoint's data.image_size (null: the checkpoint's)
    image_size: Optional[int] = None
    seed: int = 0  # torch's seed before predicting (for learners that draw random numbers at test time)
    # test-time settings of the checkpoint's learner (its eval_settings, e.g. MAML's eval_inner_steps); any
    # other key is refused in one line
    algo: dict[str, Any] = field(default_factory=dict)
    device: DeviceConfig = field(default_factory=DeviceConfig)


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
    cs.store(name="predict_schema", node=PredictRunConfig)
    for (group, name), node in sorted(all_schemas().items()):
        cs.store(group=f"schema/{group}", name=name, node=node, package=group)


register_configs()
