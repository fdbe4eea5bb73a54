"""Pictures of classification episodes (engine/pictures.py calls them):
the episode picture (support images, queries with predicted and true labels) and the embedding picture
(2-D PCA of support, query and prototype embeddings, for learners with ``embed_episode``).

The drawing functions (:func:`draw_episode`, :func:`draw_embeddings`) take plain tensors and return what
they drew, so tests can check the picture's content and ``fewshot predict`` reuses the episode picture.
Images are drawn as the data set holds them (uint8 or float, 1 or 3 channels) *before* the evaluation
transform, so no normalisation has to be undone.  matplotlib (Agg) is imported only when drawing.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import torch


EPISODE_FILE, EMBEDDING_FILE = "episode.png", "embedding.png"
MAX_QUERIES = 100  # queries an episode picture shows at most (the first ones of each class, in turn)
MAX_SHOTS = 10  # support images per class shown at most
EMBED_EPISODES = 3  # test episodes in the embedding picture, one panel each
RIGHT, WRONG, SUPPORT = "#2ca02c", "#d62728", "#1f77b4"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- images
def display_image(x: torch.Tensor):
    """One image (C, H, W), uint8 or float, 1 or 3 channels -> a numpy array for ``imshow``: (H, W) for one
    channel (drawn gray), (H, W, 3) in [0, 1] for three.  uint8 is divided by 255; a float image outside [0, 1]
    (already transformed) is stretched to [0, 1] by its own min and max."""
    x = x.detach().cpu()
    if x.dim() == 2:
        x = x.unsqueeze(0)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    if x.shape[0] == 1:
        return x[0].numpy()
    return x[:3].permute(1, 2, 0).clamp(0, 1).numpy()


def _short(name: str, width: int = 18) -> str:
    """A class name cut to ``width`` characters from the right (the distinctive end: ``.../character07``)."""
    name = name.replace("/rot000", "")
    return name if len(name) <= width else "…" + name[-(width - 1):]


def shown_queries(query_y: torch.Tensor, n_way: int, limit: int = MAX_QUERIES) -> list[int]:
    """Indices of the queries an episode picture shows: all when at most ``limit``, else the first of each
    class in turn (round robin over classes) up to ``limit``; sorted."""
    n = int(query_y.numel())
    if n <= limit:
        return list(range(n))
    per_class = [(query_y == c).nonzero().flatten().tolist() for c in range(n_way)]
    out: list[int] = []
    for k in range(max((len(p) for p in per_class), default=0)):
        for p in per_class:
            if k < len(p) and len(out) < limit:
                out.append(p[k])
    return sorted(out)


# ----------------------------------------------------------------------------- the episode picture
def draw_episode(path: str | Path, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                 predicted: torch.Tensor, probability: torch.Tensor, class_names: Sequence[str],
                 query_y: torch.Tensor | None = None, query_names: Sequence[str] | None = None,
                 title: str = "") -> dict:
    """Draw one episode to ``path`` (PNG): its support images class by class (at most ``MAX_SHOTS`` each, blue
    frames, the class name above), then the queries (at most ``MAX_QUERIES``) with the predicted class and its probability, and, where ``query_y``
    is known, the true class: a red frame marks a wrong prediction, a green one a right one.

    support_x (S, C, H, W), support_y (S,) in 0..n_way-1, query_x (Q, C, H, W); predicted (Q,) class ids and
    probability (Q,) the softmax probability of that class; class_names: n_way names; query_y (Q,) or None;
    query_names: a caption per query (``fewshot predict``: file names).  Returns what was drawn:
    ``{"queries": [shown query indices], "marked_wrong": n, "marked_right": n, "n_way": n, "support": n}``.
    """
    plt = _pyplot()
    from matplotlib.colors import to_hex

    n_way = len(class_names)
    rows_support = [(support_y == c).nonzero().flatten().tolist()[:MAX_SHOTS] for c in range(n_way)]
    cells = [(c, i) for c, idx in enumerate(rows_support) for i in idx]  # class by class, its shots in order
    shown = shown_queries(query_y if query_y is not None else predicted, n_way)
    cols = min(10, max(1, len(shown), len(cells)))
    s_rows, q_rows = math.ceil(len(cells) / cols), math.ceil(len(shown) / cols)
    fig = plt.figure(figsize=(1.3 * cols, 1.45 * (s_rows + q_rows) + 1.2))
    grid = fig.add_gridspec(s_rows + q_rows, cols, hspace=0.75)
    try:
        for k, (c, i) in enumerate(cells):  # support: a blue frame, the class name above
            ax = fig.add_subplot(grid[k // cols, k % cols])
            ax.imshow(display_image(support_x[i]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(SUPPORT)
                spine.set_linewidth(1.5)
            ax.set_title(_short(class_names[c], 16), fontsize=6, color=SUPPORT)
        for k, q in enumerate(shown):
            ax = fig.add_subplot(grid[s_rows + k // cols, k % cols])
            ax.imshow(display_image(query_x[q]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            p = int(predicted[q])
            text = f"{_short(class_names[p], 12)} {float(probability[q]):.2f}"
            if query_names is not None:
                text = f"{_short(str(query_names[q]), 14)}\n{text}"
            if query_y is not None:
                wrong = p != int(query_y[q])
                text += "" if not wrong else f"\ntrue {_short(class_names[int(query_y[q])], 12)}"
                for spine in ax.spines.values():
                    spine.set_edgecolor(WRONG if wrong else RIGHT)
                    spine.set_linewidth(3 if wrong else 1.5)
            ax.set_title(text, fontsize=6, color=WRONG if query_y is not None and wrong else "black")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.savefig(path, dpi=90)
        frames = [to_hex(ax.spines["top"].get_edgecolor()) for ax in fig.axes]  # read back from the figure
    finally:
        plt.close(fig)
    return {"queries": shown, "marked_wrong": frames.count(WRONG), "marked_right": frames.count(RIGHT),
            "n_way": n_way, "support": sum(len(r) for r in rows_support)}


# ----------------------------------------------------------------------------- the embedding picture
def pca_2d(z: torch.Tensor) -> torch.Tensor:
    """The first two principal components of points z (N, D): (N, 2) coordinates of the centred points on the
    top two right singular vectors (``torch.linalg.svd``), each sign fixed so that its largest-magnitude
    coordinate is positive; a missing component (N < 2 or D < 2) is 0."""
    z = z.detach().double().cpu()
    centred = z - z.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    out = torch.zeros(z.shape[0], 2, dtype=torch.float64)
    k = min(2, vh.shape[0])
    proj = centred @ vh[:k].T
    for j in range(k):
        col = proj[:, j]
        if col.numel() and col[col.abs().argmax()] < 0:
            proj[:, j] = -col
    out[:, :k] = proj
    return out


def draw_embeddings(path: str | Path, panels: list[dict[str, torch.Tensor]], title: str = "") -> list[torch.Tensor]:
    """One panel per episode: its support (o), query (x) and prototype (*) embeddings projected by :func:`pca_2d`
    (fitted on that episode's points), coloured by class.  Each panel: ``{"support": (S, D), "support_y": (S,),
    "query": (Q, D), "query_y": (Q,), "prototypes": (n_way, D) or absent}``.  Returns each panel's (N, 2)
    projection, rows: support, then query, then prototypes."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    cmap = plt.get_cmap("tab20")
    out = []
    try:
        for ax, p in zip(axes[0], panels):
            parts = [p["support"], p["query"]] + ([p["prototypes"]] if p.get("prototypes") is not None else [])
            xy = pca_2d(torch.cat([t.reshape(t.shape[0], -1) for t in parts]))
            out.append(xy)
            s, q = p["support"].shape[0], p["query"].shape[0]
            colours = [cmap(int(c) % 20) for c in p["support_y"]]
            ax.scatter(xy[:s, 0], xy[:s, 1], c=colours, marker="o", s=28, label="support")
            ax.scatter(xy[s:s + q, 0], xy[s:s + q, 1], c=[cmap(int(c) % 20) for c in p["query_y"]], marker="x", s=22,
                       label="query")
            if len(parts) == 3:
                n = parts[2].shape[0]
                ax.scatter(xy[s + q:, 0], xy[s + q:, 1], c=[cmap(c % 20) for c in range(n)], marker="*", s=220,
                           edgecolors="black", linewidths=0.8, label="prototype")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_xlabel("PC 1"), ax.set_ylabel("PC 2")
        axes[0][0].legend(loc="best", fontsize=7)
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
    finally:
        plt.close(fig)
    return out


# ----------------------------------------------------------------------------- makers (engine/pictures.py)
def _drawn_episodes(split, shape, seed: int, n: int):
    """The first ``n`` test episodes for ``seed`` (those ``engine/evaluate.py`` scores first) and the class of
    each (T, n_way) label, from the sampler's own draw."""
    from fewshot_runner.data.sampler import EPISODE_BLOCK, EpisodeSampler

    sampler = EpisodeSampler(split, shape.n_way, shape.n_shot, shape.n_query, seed)
    items = sampler.draw(EPISODE_BLOCK)[:n]  # as fixed_episodes draws its first block
    return sampler.gather(items), split.labels[items[:, :, 0]]


def _on_device(episodes, runtime, transform):
    episodes = episodes.to(runtime.device)
    return episodes.map_inputs(transform) if transform is not None else episodes


def _skip(what: str, e: BaseException) -> list:
    warnings.warn(f"no {what} picture ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", stacklevel=3)
    return []


def episode_picture(algo, split, shape, runtime, transform, out_dir: Path, seed: int) -> list[tuple[Path, str]]:
    """The first test episode for ``seed``: its support images and its queries with predicted and true classes.
    A picture that cannot be drawn (no matplotlib, a failure while drawing) is a warning, never an error."""
    try:
        return _episode_picture(algo, split, shape, runtime, transform, out_dir, seed)
    except Exception as e:  # noqa: BLE001 - pictures never fail a run whose numbers are written
        return _skip("episode", e)


def _episode_picture(algo, split, shape, runtime, transform, out_dir: Path, seed: int) -> list[tuple[Path, str]]:
    episodes, classes = _drawn_episodes(split, shape, seed, 1)
    with torch.no_grad(), runtime.autocast():
        logits = algo.predict(_on_device(episodes, runtime, transform))
    prob = torch.softmax(logits[0].float(), -1).cpu()
    ep = episodes.task(0)
    path = Path(out_dir) / EPISODE_FILE
    draw_episode(path, ep.support_x, ep.support_y, ep.query_x, prob.argmax(-1), prob.max(-1).values,
                         [split.class_names[int(c)] for c in classes[0]], query_y=ep.query_y,
                         title=f"{type(algo).__name__}: a {shape.n_way}-way {shape.n_shot}-shot {split.name} episode")
    return [(path, "episode")]


def embedding_picture(algo, split, shape, runtime, transform, out_dir: Path, seed: int) -> list[tuple[Path, str]]:
    """PCA of a few test episodes' embeddings, for learners whose ``embed_episode`` gives them (a warning, never
    an error, when it cannot be drawn)."""
    try:
        return _embedding_picture(algo, split, shape, runtime, transform, out_dir, seed)
    except Exception as e:  # noqa: BLE001 - pictures never fail a run whose numbers are written
        return _skip("embedding", e)


def _embedding_picture(algo, split, shape, runtime, transform, out_dir: Path, seed: int) -> list[tuple[Path, str]]:
    episodes, _ = _drawn_episodes(split, shape, seed, EMBED_EPISODES)
    moved = _on_device(episodes, runtime, transform)
    with torch.no_grad(), runtime.autocast():
        emb = algo.embed_episode(moved)
    if emb is None:
        return []
    panels = [{"support": emb["support"][t].float().cpu(), "support_y": episodes.support_y[t],
               "query": emb["query"][t].float().cpu(), "query_y": episodes.query_y[t],
               "prototypes": emb["prototypes"][t].float().cpu() if emb.get("prototypes") is not None else None}
              for t in range(episodes.n_tasks)]
    path = Path(out_dir) / EMBEDDING_FILE
    draw_embeddings(path, panels, title=f"{type(algo).__name__}: embeddings of {episodes.n_tasks} {split.name} "
                                        f"episodes (PCA per episode; o support, x query, * prototype)")
    return [(path, "embedding")]
