"""Bench cases of the gradient family beyond MAML: Reptile, MAML++ and the LSTM meta-learner (see
bench_cases/__init__.py for what each function returns).

Each case's package side is built from the project's configs (``bench.compose_learner``) and stepped as
the training loop steps it (``set_progress``, then the learner's own ``outer_step`` when it has one
(Reptile), else ``gradient_outer_step``), with the optimizer ``fewshot train`` makes.  The reference is
written here, the usual way, on the same weights (generated here) and the same tasks
(``bench.make_episodes``), with the same training progress (the schedules' inputs):

* ``reptile``: the paper's Omniglot shape (conf/paper/reptile_omniglot.yaml: 10 images per class in a
  training task, 5 inner steps on batches of 10, meta-batch 5) on its strided Conv4, with the algo config's
  SGD (0.1), the same at meta-batch 32, and with the paper's inner optimizer (Adam 1e-3, beta1 0, its state
  carried from task to task and step to step).  Reference: the paper's code structure: one inner optimizer
  over one net, made once; per task the weights copied into the net, 5 optimizer steps on mini-batches that
  walk a random order of the task's 50 images, then theta += eps * mean(phi - theta), eps annealed from 1 to
  0 (at step ``PROGRESS[0]`` of ``PROGRESS[1]``: 0.75).  The check compares the UPDATE theta' - theta of one
  outer step (both sides draw the mini-batch orders from the global generator seeded alike).
* ``mamlpp``: 5-way 1-shot, the paper's Omniglot training shape (1 query per class, meta-batch 8), its
  defaults (5 steps, multi-step loss, learned per-layer per-step rates, per-step batch-norm weights and
  running statistics) with second order from the first step (``algo.first_order_until=0``: with the
  default annealing the multi-step loss, first 10 % of training, and second order, last 50 %, never meet;
  this way one step has both) at step 50 of 2,000 (MSL weights 0.15 x 4, 0.4).  Reference: a per-task
  ``functional_call`` loop, step k's batch-norm rows in its support and query forwards, rates
  ``lr[layer][k]``, sum_k w_k query loss_k.  Per-step rows and rates are perturbed off their equal
  initial values (seeded), so a wrong row or rate shows.
* ``meta_lstm``: 5-way 1-shot, 15 queries, one episode per step (the learner's batch), 12 updates.
  Reference: the structure of the paper's code (and its PyTorch ports): a learner module into which the
  flat cell state is copied (no graph) for each update, its loss and ``.grad`` by ``backward``, both
  preprocessed (Andrychowicz et al., p = 10), an ``nn.LSTMCell(4, 20)``, and the meta cell
  c_t = f_t * c_{t-1} - i_t * grad, f_t = sigmoid([h, c_{t-1}, f_{t-1}] W_F + b_F) (i_t alike); the query
  loss of the learner holding the final c (views, with the graph); gradient clipping at 0.25 as the config.
  Where a PyTorch port departs from the paper's equations the reference follows the paper (and the package):
  the previous gate VALUE f_{t-1} (a port feeds its pre-activation), log|x| without a 1e-8 added.

Checks: as bench.gradient_check (the meta-gradient, Reptile's update), on the smooth twin when the package
runs unfused (``fused_ops=off``), else the real ReLU / max-pool net; the first task of the batch with
``--tiny``, else the first 4 (Reptile: its whole batch, the update being a mean over it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import bench
from bench import Case

WORKLOADS: tuple[str, ...] = ("reptile", "mamlpp", "meta_lstm")
ADAM = ("algo.inner_optimizer=adam", "algo.inner_lr=0.001", "algo.inner_beta1=0.0", "algo.inner_beta2=0.999",
        "algo.inner_eps=1e-08", "algo.inner_state=carry")
CASES: list = [
    # Reptile: n_shot 1 + n_query 9 = the paper's 10-image pool per class; inner_steps 5 (batches of 10 from its config)
    Case("reptile_5w1s_mb5_strided", "reptile", 5, 1, 9, 5, 2, quick=(1, 5), full=(2, 20), inner_steps=5,
         strided=True, algo="reptile"),
    Case("reptile_5w1s_mb32_strided", "reptile", 5, 1, 9, 32, 2, quick=(1, 3), full=(2, 10), inner_steps=5,
         strided=True, algo="reptile"),
    # the paper's inner optimizer (conf/paper/reptile_omniglot.yaml): Adam 1e-3, beta1 0, its state carried over
    Case("reptile_5w1s_mb5_strided_adam", "reptile", 5, 1, 9, 5, 2, quick=(1, 5), full=(2, 20), inner_steps=5,
         strided=True, algo="reptile", overrides=ADAM),
    # MAML++: the paper's Omniglot training shape (1 query per class, meta-batch 8), and meta-batch 32 x 15 queries
    Case("mamlpp_5w1s_mb8_5step_1q", "mamlpp", 5, 1, 1, 8, 2, quick=(1, 3), full=(2, 10), inner_steps=5,
         algo="mamlpp"),
    # what the per-step running statistics cost: without them the tasks may run as grouped convolutions
    Case("mamlpp_5w1s_mb8_5step_1q_nobnrs", "mamlpp", 5, 1, 1, 8, 2, quick=(1, 3), full=(2, 10), inner_steps=5,
         algo="mamlpp", overrides=("algo.per_step_bn_stats=false",)),
    Case("mamlpp_5w1s_mb32_5step", "mamlpp", 5, 1, 15, 32, 2, quick=(1, 2), full=(1, 5), inner_steps=5,
         algo="mamlpp"),
    Case("meta_lstm_5w1s_12step", "meta_lstm", 5, 1, 15, 1, 1, quick=(1, 3), full=(2, 10), inner_steps=12,
         algo="meta_lstm"),
    # device.compile=true: the meta-learner's step (layer 1 + the cell over every coordinate) compiled; its
    # compile falls in the two warm-up steps
    Case("meta_lstm_5w1s_12step_compiled", "meta_lstm", 5, 1, 15, 1, 1, quick=(2, 3), full=(2, 10),
         inner_steps=12, algo="meta_lstm", overrides=("device.compile=true",)),
]

PROGRESS = {"reptile": (500, 2000), "mamlpp": (50, 2000), "meta_lstm": (0, 2000)}  # set_progress(step, total)
SEED_EXTRA, SEED_PERMS = 7, 11  # the per-step rows / rates and LSTM weights; Reptile's mini-batch orders
REPTILE_LR, REPTILE_BATCH, ADAM_LR = 0.1, 10, 1e-3  # conf/algo/reptile.yaml; Adam's: the paper's (ADAM)
MAMLPP_LR, MSL_FLOOR = 0.1, 0.03  # conf/algo/mamlpp.yaml; the paper's code's floor of the early steps' weights
LSTM_HIDDEN, LSTM_P, LSTM_CLIP = 20, 10.0, 0.25  # conf/algo/meta_lstm.yaml
N_BLOCKS = 4


# ============================================================================= shared weights
def conv4_names(with_bn: bool) -> list[str]:
    """The reference Conv4's parameter names (bench.plain_conv4_cls), in bench.make_weights' order."""
    out = []
    for i in range(N_BLOCKS):
        out += [f"blocks.{i}.conv.weight", f"blocks.{i}.conv.bias"]
        out += [f"blocks.{i}.bn.weight", f"blocks.{i}.bn.bias"] if with_bn else []
    return out + ["head.weight", "head.bias"]


def case_weights(case: Case) -> dict:
    """The shared initial meta-parameters by reference name (fp32): Conv4 + head (bench.make_weights);
    MAML++: per-step batch-norm rows (K, C) in place of gamma / beta, and ``lr:NAME`` (K,) rates; LSTM
    meta-learner: ``lstm.*`` (nn.LSTMCell's names) and ``cell.*`` with the paper's initialisation."""
    import torch

    base = dict(zip(conv4_names(True), bench.make_weights(case.n_way, case.feature_dim)))
    g = torch.Generator().manual_seed(SEED_EXTRA)
    if case.workload == "mamlpp":
        k = case.inner_steps
        for i in range(N_BLOCKS):
            c = base[f"blocks.{i}.bn.weight"].shape[0]
            base[f"blocks.{i}.bn.weight"] = 1.0 + 0.1 * torch.randn(k, c, generator=g)
            base[f"blocks.{i}.bn.bias"] = 0.1 * torch.randn(k, c, generator=g)
        for name in conv4_names(False):
            base[f"lr:{name}"] = MAMLPP_LR * (0.5 + torch.rand(k, generator=g))
    elif case.workload == "meta_lstm":
        h = LSTM_HIDDEN

        def u(shape, lo, hi):
            return lo + (hi - lo) * torch.rand(shape, generator=g)

        base.update({"lstm.weight_ih": u((4 * h, 4), -0.01, 0.01), "lstm.weight_hh": u((4 * h, h), -0.01, 0.01),
                     "lstm.bias_ih": u((4 * h,), -0.01, 0.01), "lstm.bias_hh": u((4 * h,), -0.01, 0.01),
                     "cell.weight_f": u((h + 2,), -0.01, 0.01), "cell.weight_i": u((h + 2,), -0.01, 0.01),
                     "cell.bias_f": u((), 4.0, 5.0), "cell.bias_i": u((), -5.0, -4.0)})
    return base


def package_name(case: Case, name: str) -> str:
    """The package learner's parameter name of a reference name."""
    from fewshot_runner.algorithms.metasgd import rate_key

    def net(n: str) -> str:
        return "0." + n if n.startswith("blocks.") else "1." + n[len("head."):]

    if name.startswith(("lstm.", "cell.")):
        return name
    if name.startswith("lr:"):
        return "inner_lrs." + rate_key(net(name[3:]))
    if case.workload == "mamlpp" and ".bn." in name:
        layer, kind = name.rsplit(".", 1)
        return f"norms.{rate_key(net(layer))}.{kind}"
    return "net." + net(name)


def load_package(case: Case, algo) -> None:
    """The shared weights into the package learner, every meta-parameter named (none left out)."""
    import torch

    weights = case_weights(case)
    params = dict(algo.named_parameters())
    names = {package_name(case, k): k for k in weights}
    if set(names) != set(params):
        raise RuntimeError(f"{case.algo}: parameters {sorted(set(params) ^ set(names))} not matched")
    with torch.no_grad():
        for pname, rname in names.items():
            params[pname].copy_(weights[rname].reshape(params[pname].shape))


def reference_leaves(case: Case, device, dtype) -> dict:
    return {k: v.to(device=device, dtype=dtype).requires_grad_() for k, v in case_weights(case).items()}


# ============================================================================= the plain references
def reference_net(case: Case, device, dtype, smooth: bool, head: bool = True):
    """bench's plain Conv4 (conv -> F.batch_norm(batch statistics) -> relu -> max-pool, or the strided net)."""
    net = bench.plain_conv4_cls()(bench.X_SHAPE[0], bench.HIDDEN, case.n_way if head else None, case.feature_dim,
                                  smooth, case.strided)
    return net.to(device=device, dtype=dtype)


def reptile_orders(n_tasks: int, n_images: int):
    """Each task's random order of its pool (T, n_images): the global generator, one draw per outer step."""
    import torch

    return torch.rand(n_tasks, n_images).argsort(1)


def reptile_inner_optimizer(case: Case, net):
    """The inner optimizer over the net's parameters, made once and kept (the paper's code: one optimizer
    whose state, Adam's moments and step count, carries from task to task; SGD keeps none)."""
    import torch

    if "algo.inner_optimizer=adam" in case.overrides:
        return torch.optim.Adam(net.parameters(), lr=ADAM_LR, betas=(0.0, 0.999), eps=1e-8)
    return torch.optim.SGD(net.parameters(), lr=REPTILE_LR)


def reptile_reference_update(case: Case, net, inner, theta: dict, episodes, eps: float, orders) -> dict:
    """One Reptile outer step the paper's way; returns the new weights by name (detached).

    ``net``: the plain Conv4 (its parameters are overwritten task after task), ``inner``: its optimizer
    (:func:`reptile_inner_optimizer`); ``theta``: weights by name; ``orders`` (T, N): each task's order of its
    pool x (N = shots + queries per class x n_way), walked in mini-batches of REPTILE_BATCH (wrapping around),
    one per inner step."""
    import torch
    import torch.nn.functional as F

    x = torch.cat([episodes.support_x, episodes.query_x], 1)
    y = torch.cat([episodes.support_y, episodes.query_y], 1)
    n = x.shape[1]
    params = dict(net.named_parameters())
    total = {k: torch.zeros_like(v) for k, v in theta.items()}
    for t in range(x.shape[0]):
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(theta[k])
        for s in range(case.inner_steps):
            idx = orders[t, [(s * REPTILE_BATCH + j) % n for j in range(min(REPTILE_BATCH, n))]]
            inner.zero_grad(set_to_none=True)
            F.cross_entropy(net(x[t, idx]), y[t, idx]).backward()
            inner.step()
        for k, p in params.items():
            total[k] += p.detach() - theta[k]
    return {k: theta[k] + eps * total[k] / x.shape[0] for k in theta}


def reptile_eps() -> float:
    """The paper's linear annealing of the outer step size, 1 -> 0, at PROGRESS's step."""
    step, total = PROGRESS["reptile"]
    return 1.0 - step / total


def msl_weights(steps: int) -> list[float]:
    """MAML++'s multi-step loss weights at PROGRESS's step (the paper's code,
    get_per_step_loss_importance_vector, annealed over the first 10 % of training)."""
    step, total = PROGRESS["mamlpp"]
    decay = 1.0 / steps * (step / (total // 10))
    early = max(1.0 / steps - decay, MSL_FLOOR / steps)
    last = min(1.0 / steps + decay * (steps - 1), 1.0 - (steps - 1) * MSL_FLOOR / steps)
    return [early] * (steps - 1) + [last]


def mamlpp_reference_loss(case: Case, net, w: dict, episodes):
    """The MAML++ objective: per task, K inner steps (step k: batch-norm rows k, rates lr[layer][k],
    second order), the query loss after every step weighted by msl_weights; mean over tasks."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    K, weights = case.inner_steps, msl_weights(case.inner_steps)
    adapted = conv4_names(False)
    losses = []
    for t in range(episodes.n_tasks):
        fast = {k: w[k] for k in adapted}
        loss_t = 0.0
        for k in range(K):
            bn = {f"blocks.{i}.bn.{p}": w[f"blocks.{i}.bn.{p}"][k] for i in range(N_BLOCKS) for p in ("weight", "bias")}
            support = F.cross_entropy(functional_call(net, {**fast, **bn}, (episodes.support_x[t],)),
                                      episodes.support_y[t])
            grads = torch.autograd.grad(support, list(fast.values()), create_graph=True)
            fast = {n: p - w[f"lr:{n}"][k] * g for (n, p), g in zip(fast.items(), grads)}
            query = F.cross_entropy(functional_call(net, {**fast, **bn}, (episodes.query_x[t],)), episodes.query_y[t])
            loss_t = loss_t + weights[k] * query
        losses.append(loss_t)
    return torch.stack(losses).mean()


def preprocess(x, p: float = LSTM_P):
    """Andrychowicz et al. (2016): (log|x| / p, sign x) where |x| >= e^-p, else (-1, e^p x); (...,) -> (..., 2)."""
    import torch

    big = x.abs() >= math.exp(-p)
    first = torch.where(big, torch.log(x.abs()) / p, -torch.ones_like(x))
    second = torch.where(big, torch.sign(x), math.exp(p) * x)
    return torch.stack([first, second], -1)


def lstm_reference_loss(case: Case, learner, lstm, w: dict, episodes):
    """The LSTM meta-learner's objective the paper's code's way (module docstring); ``learner``: the plain
    Conv4 whose parameters each update overwrites, ``lstm``: an nn.LSTMCell(4, H) run on ``w``'s weights."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    names = conv4_names(True)
    shapes = [w[k].shape for k in names]
    c0 = torch.cat([w[k].reshape(-1) for k in names])  # the cell state's initial value (cI)
    lstm_w = {k[len("lstm."):]: w[k] for k in w if k.startswith("lstm.")}
    wf, wi = w["cell.weight_f"].unsqueeze(1), w["cell.weight_i"].unsqueeze(1)  # (H + 2, 1), as WF / WI
    params = list(learner.parameters())
    losses = []
    for t in range(episodes.n_tasks):
        c, state = c0, None
        f = i = torch.zeros_like(c0).unsqueeze(1)
        for _ in range(case.inner_steps):
            with torch.no_grad():  # learner_wo_grad.copy_flat_params(cI)
                for p, v in zip(params, c.detach().split([math.prod(s) for s in shapes])):
                    p.copy_(v.view_as(p))
            learner.zero_grad(set_to_none=True)
            loss = F.cross_entropy(learner(episodes.support_x[t]), episodes.support_y[t])
            loss.backward()
            grad = torch.cat([p.grad.reshape(-1) for p in params])
            inp = torch.cat([preprocess(loss.detach()).expand(len(grad), 2), preprocess(grad)], 1)
            state = functional_call(lstm, lstm_w, (inp, state))
            f = torch.sigmoid(torch.cat([state[0], c.unsqueeze(1), f], 1) @ wf + w["cell.bias_f"])
            i = torch.sigmoid(torch.cat([state[0], c.unsqueeze(1), i], 1) @ wi + w["cell.bias_i"])
            c = f.squeeze(1) * c - i.squeeze(1) * grad
        final = dict(zip([n for n, _ in learner.named_parameters()], (v.view(s) for v, s in zip(
            c.split([math.prod(s) for s in shapes]), shapes))))  # learner_w_grad.transfer_params(cI)
        losses.append(F.cross_entropy(functional_call(learner, final, (episodes.query_x[t],)), episodes.query_y[t]))
    return torch.stack(losses).mean()


class Reference:
    """The plain reference of one case in ``dtype``: ``loss(episodes)`` (differentiable in ``leaves``;
    Reptile: ``update(episodes, orders)``, the new weights)."""

    def __init__(self, case: Case, device, dtype, smooth: bool) -> None:
        import torch

        self.case = case
        self.leaves = reference_leaves(case, device, dtype)
        self.net = reference_net(case, device, dtype, smooth)
        if case.workload == "meta_lstm":
            self.lstm = torch.nn.LSTMCell(4, LSTM_HIDDEN).to(device=device, dtype=dtype)
        if case.workload == "reptile":
            self.inner = reptile_inner_optimizer(case, self.net)
            with torch.no_grad():
                for k, p in self.net.named_parameters():
                    p.copy_(self.leaves[k])
                    self.leaves[k] = p  # Reptile's weights are the net's own (the paper's stateful model)

    def loss(self, episodes):
        if self.case.workload == "mamlpp":
            return mamlpp_reference_loss(self.case, self.net, self.leaves, episodes)
        return lstm_reference_loss(self.case, self.net, self.lstm, self.leaves, episodes)

    def update(self, episodes, orders) -> dict:
        theta = {k: v.detach().clone() for k, v in self.leaves.items()}
        return reptile_reference_update(self.case, self.net, self.inner, theta, episodes, reptile_eps(), orders)


def reference_step(case: Case, device, tiny: bool):
    import torch

    ref = Reference(case, device, torch.float32, smooth=False)
    episodes = bench.make_episodes(case, tiny, device)
    if case.workload == "reptile":
        n_images = episodes.support_x.shape[1] + episodes.query_x.shape[1]

        def step() -> float:
            new = ref.update(episodes, reptile_orders(episodes.n_tasks, n_images).to(device))
            with torch.no_grad():
                for k, p in ref.leaves.items():
                    p.copy_(new[k])
            return 0.0

        return step
    opt = torch.optim.Adam(list(ref.leaves.values()), lr=bench.OUTER_LR)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = ref.loss(episodes)
        loss.backward()
        if case.workload == "meta_lstm":
            torch.nn.utils.clip_grad_norm_(list(ref.leaves.values()), LSTM_CLIP)
        opt.step()
        return float(loss.detach())

    return step


# ============================================================================= the package
def package(case: Case, device_type: str, threads: int, fused: str, precision: str, tiny: bool):
    """(algo, runtime, cfg) built from the configs as ``fewshot train`` builds them, with the shared weights."""
    overrides = ["backbone=conv4", f"backbone.hidden={bench.HIDDEN}", f"backbone.pool={str(not case.strided).lower()}",
                 f"data.n_way={case.n_way}", f"data.n_shot={case.n_shot}", f"data.n_query={case.n_query}",
                 f"train.meta_batch_size={case.batch(tiny)}", f"train.steps={PROGRESS[case.workload][1]}",
                 f"algo.inner_steps={case.inner_steps}", *case.overrides]
    if case.workload == "mamlpp":
        overrides.append("algo.first_order_until=0")  # second order at once (module docstring)
    algo, runtime, cfg = bench.compose_learner(case.algo, device_type, threads, fused, precision, overrides)
    load_package(case, algo)
    algo.train()
    return algo, runtime, cfg


def engine_step(case: Case, algo, optimizer, episodes, runtime, cfg, planner=None, graphed=None,
                clip: bool = True) -> dict:
    """One training step as engine/loop.py's outer_update takes it (``clip=False``: no gradient clipping, for
    the check, which compares the raw meta-gradients)."""
    from fewshot_runner.engine.outer_step import gradient_outer_step

    algo.set_progress(*PROGRESS[case.workload])
    if algo.has_own_outer_step():
        return algo.outer_step(episodes, optimizer)
    return gradient_outer_step(algo, optimizer, episodes, runtime, cfg.train.task_chunk,
                               cfg.train.grad_clip if clip else None, planner, graphed)


def fast_step(case: Case, device_type: str, threads: int, fused: str, precision: str, tiny: bool):
    from fewshot_runner.engine.build import make_optimizer
    from fewshot_runner.engine.outer_step import step_helpers
    from fewshot_runner.engine.task_threads import task_threads_for

    algo, runtime, cfg = package(case, device_type, threads, fused, precision, tiny)
    episodes = bench.make_episodes(case, tiny, runtime.device)
    optimizer = make_optimizer(cfg, algo)
    planner, graphed = step_helpers(algo, runtime, cfg.train)
    info = {"task_threads": 1 if algo.has_own_outer_step() else task_threads_for(algo, episodes, runtime),
            "channels_last": runtime.channels_last}
    algo.set_progress(*PROGRESS[case.workload])
    if case.workload == "reptile":
        info["task_mode"] = algo.train_mode(episodes)  # (Reptile's training execution)
    elif case.workload == "mamlpp":
        info["task_mode"] = algo.task_mode(episodes)

    def step() -> float:
        return float(engine_step(case, algo, optimizer, episodes, runtime, cfg, planner, graphed)["loss"])

    return step, info


# ============================================================================= the check
def package_result(case: Case, algo, runtime, cfg, episodes, dtype) -> list:
    """Package side of the check in ``dtype``, per reference name (case_weights' order): the meta-gradient
    (an optimizer that moves nothing), or Reptile's update theta' - theta."""
    import torch

    algo = algo.to(dtype)
    load_package(case, algo)
    episodes = episodes.map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t)
    if dtype != torch.float32:
        runtime = dataclasses.replace(runtime, autocast_dtype=None)
    params = dict(algo.named_parameters())
    names = [package_name(case, k) for k in case_weights(case)]
    before = [params[n].detach().clone() for n in names]
    torch.manual_seed(SEED_PERMS)
    engine_step(case, algo, torch.optim.SGD(algo.parameters(), lr=0.0), episodes, runtime, cfg, clip=False)
    if case.workload == "reptile":
        return [params[n].detach() - b for n, b in zip(names, before)]
    return [torch.zeros_like(params[n]) if params[n].grad is None else params[n].grad.detach().clone() for n in names]


def reference_result(case: Case, episodes, device, dtype, smooth: bool) -> list:
    import torch

    ref = Reference(case, device, dtype, smooth)
    episodes = episodes.map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t)
    if case.workload == "reptile":
        torch.manual_seed(SEED_PERMS)
        orders = reptile_orders(episodes.n_tasks, episodes.support_x.shape[1] + episodes.query_x.shape[1])
        theta = {k: v.detach().clone() for k, v in ref.leaves.items()}
        new = ref.update(episodes, orders.to(device))
        return [(new[k] - theta[k]).detach() for k in ref.leaves]
    grads = torch.autograd.grad(ref.loss(episodes), list(ref.leaves.values()))
    shapes = case_weights(case)
    return [g.detach().reshape(shapes[k].shape) for k, g in zip(ref.leaves, grads)]


def check(case: Case, tiny: bool) -> dict:
    import torch

    fused, _ = bench.fused_ops_mode()
    def build():  # a fresh learner per precision (Reptile's carried Adam state starts at zero in each)
        return package(case, "cpu", torch.get_num_threads(), fused, "fp32", tiny)  # (on CPU)

    device = torch.device("cpu")
    n_check = case.batch(tiny) if case.workload == "reptile" else (1 if tiny else min(case.batch(tiny), 4))
    episodes = bench.make_episodes(case, tiny, device).tasks(0, n_check)
    smooth = fused == "off"
    twin = bench.package_smooth_twin if smooth else contextlib.nullcontext
    ref64 = reference_result(case, episodes, device, torch.float64, smooth)
    ref32 = reference_result(case, episodes, device, torch.float32, smooth)
    with twin():
        fast32 = package_result(case, *build(), episodes, torch.float32)
        fast64 = package_result(case, *build(), episodes, torch.float64)
    err, zero_err = bench.relative_errors(fast32, ref64)
    act, pool = ("softplus", "avg-pool") if smooth else ("relu", "max-pool")
    net = f"{'smooth twin' if smooth else 'real net'} ({act}{'' if case.strided else ', ' + pool})"
    what = ("the update theta' - theta of one outer step" if case.workload == "reptile" else "the meta-gradient")
    out = {
        "grad_rel_err": err,
        "zero_grad_err": zero_err,
        "ref_grad_rel_err": bench.relative_errors(ref32, ref64)[0],
        "grad_rel_err_vs_ref_fp32": bench.relative_errors(fast32, ref32)[0],
        "grad_rel_err_fp64": bench.relative_errors(fast64, ref64)[0],
        "grad_check": f"{net}; {what}, fast fp32 vs plain reference fp64; first {n_check} tasks of the batch, "
                      f"initial weights",
        "grad_check_tasks": n_check,
    }
    if "algo.inner_optimizer=adam" in case.overrides:  # (measured: zero_grad_err 1.7e-2 here, the reference's alike)
        out["check_note"] = ("Adam scales each coordinate's step by 1/(|g| + eps): the conv biases before batch norm, "
                             "whose gradient is 0 in exact arithmetic, move by fp32 rounding noise in any fp32 "
                             "implementation (zero_grad_err; harmless: batch norm cancels them)")
    return out


def describe(case: Case) -> tuple[str, str]:
    extra = "".join(f", {o}" for o in case.overrides) + ", fused ops as available"
    if case.workload == "reptile":
        return (f"package reptile via its own outer_step, eps {reptile_eps():.2f}{extra}",
                "paper-style loop: per task copy weights, 5 torch.optim.SGD steps on batches of 10, "
                "theta += eps * mean(phi - theta), fp32, unfused")
    if case.workload == "mamlpp":
        return (f"package mamlpp via gradient_outer_step, defaults + first_order_until=0, MSL at step "
                f"{PROGRESS['mamlpp'][0]}/{PROGRESS['mamlpp'][1]}{extra}",
                "per-task functional_call loop, per-step BN rows, per-layer per-step rates, weighted per-step "
                "query losses, autograd.grad(create_graph=True), fp32, unfused")
    return (f"package meta_lstm via gradient_outer_step, grad_clip {LSTM_CLIP}{extra}",
            "paper-code structure: learner module per update (copy flat c, backward), preprocessing, "
            "nn.LSTMCell + meta cell on the flat vector, clip 0.25, fp32, unfused")
