"""The schema of ``fewshot predict`` (conf/predict.yaml): classify the user's own images with a trained model.

Stored in Hydra's ConfigStore as ``predict_schema`` when :func:`fewshot_runner.schemas.all_schemas` imports
this module (from ``fewshot_runner.config``, whose run-level ``DeviceConfig`` it uses).  No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fewshot_runner.config import DeviceConfig


@dataclass
class PredictRunConfig:
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


ConfigStore.instance().store(name="predict_schema", node=PredictRunConfig)
