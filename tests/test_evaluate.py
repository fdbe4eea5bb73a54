import torch
from torch import nn

from fewshot_runner.algorithms.protonet import PrototypicalNetworks
from fewshot_runner.data.synthetic import Synthetic
from fewshot_runner.engine import evaluate as evaluate_module
from fewshot_runner.engine.device import Runtime
from fewshot_runner.engine.evaluate import evaluate

CPU = Runtime(torch.device("cpu"), None, False)


class Recording(PrototypicalNetworks):
    """ProtoNet on raw pixels that records how many images each predict call saw."""

    def __init__(self) -> None:
        super().__init__(nn.Flatten(), 5, 64)
        self.images: list[int] = []

    def predict(self, episodes):
        self.images.append(episodes.support_x.shape[:2].numel() + episodes.query_x.shape[:2].numel())
        return super().predict(episodes)


def test_evaluation_forwards_are_bounded_and_give_the_same_episodes_and_accuracy(monkeypatch):
    split = Synthetic(per_class=20, image_size=8, channels=1, seed=0).split("test")
    # 120 episodes of 5-way 1-shot 5 queries (30 images), drawn in blocks of 50, 50, 20
    monkeypatch.setattr(evaluate_module, "EVAL_IMAGES_PER_FORWARD", 100)  # -> 3 tasks per forward
    capped = Recording()
    small = evaluate(capped, split, 5, 1, 5, 120, seed=3, chunk=20, runtime=CPU)
    assert max(capped.images) <= 90 and len(capped.images) == 17 + 17 + 7  # 50 = 16*3+2, 20 = 6*3+2
    monkeypatch.setattr(evaluate_module, "EVAL_IMAGES_PER_FORWARD", 10**9)
    by_chunk = Recording()
    chunked = evaluate(by_chunk, split, 5, 1, 5, 120, seed=3, chunk=20, runtime=CPU)  # -> 20 tasks per forward
    assert by_chunk.images == [600, 600, 300, 600, 600, 300, 600]
    whole = Recording()
    big = evaluate(whole, split, 5, 1, 5, 120, seed=3, chunk=1000, runtime=CPU)
    assert whole.images == [1500, 1500, 600]  # a whole block at once
    # neither eval.chunk nor the image cap changes the episodes, so neither changes the result
    assert small == chunked == big and small["n_episodes"] == 120 and 0.0 < small["acc"] < 1.0


def test_the_image_bound_shrinks_with_larger_images(monkeypatch):
    """The bound holds for images up to 28 x 28; 56 x 56 images (4x the pixels) go 4x fewer at a time."""
    monkeypatch.setattr(evaluate_module, "EVAL_IMAGES_PER_FORWARD", 400)
    for size, cap in ((8, 400), (28, 400), (56, 100)):
        split = Synthetic(per_class=20, image_size=size, channels=1, seed=0).split("test")
        learner = Recording()
        evaluate(learner, split, 5, 1, 5, 40, seed=3, chunk=50, runtime=CPU)
        assert max(learner.images) <= cap and max(learner.images) > cap - 30  # whole 30-image tasks up to the cap


def test_one_task_over_the_cap_still_runs(monkeypatch):
    split = Synthetic(per_class=20, image_size=8, channels=1, seed=0).split("test")
    monkeypatch.setattr(evaluate_module, "EVAL_IMAGES_PER_FORWARD", 10)
    learner = Recording()
    assert evaluate(learner, split, 5, 1, 5, 4, seed=3, chunk=4, runtime=CPU)["n_episodes"] == 4
    assert learner.images == [30, 30, 30, 30]
