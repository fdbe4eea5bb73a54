"""``fewshot predict checkpoint=PATH support=DIR query=DIR [out=FILE.csv]``: classify the user's own images.

``support/<class_name>/*`` holds the few labelled examples of each class, ``query/*`` the images to classify.
The checkpoint's learner adapts to (or embeds) the support set exactly as at test time: one episode, the
support images with their class ids, the queries with a dummy label, through ``algo.predict``.  Every image,
of any size and PIL mode, is converted as the checkpoint's data set converts its own files
(``data.decode.image_spec``: Omniglot's gray + resize + inversion, ...), then moved and transformed as test
episodes are (uint8 -> float in [0, 1] on the device, the data set's evaluation transform).

Writes the CSV (``out=``, else ``predictions.csv`` in the run dir: ``file,predicted_class,probability`` and
one probability column per class, a row per query image) and the picture ``predictions.png`` (the episode
picture of plots_episodes.py) in the run dir, nothing elsewhere; prints a table.  Bad input (a missing
folder, an empty or a single class, a file that is not an image, an image size the model cannot take) is one
UserError line.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fewshot_runner.errors import UserError

CSV_FILE, PICTURE_FILE = "predictions.csv", "predictions.png"
QUERY_CHUNK = 1024  # queries per forward (the same support set each time): bounds memory for any number
TABLE_ROWS = 40  # rows of the printed table at most (the CSV has them all)


# ----------------------------------------------------------------------------- folders and images
def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _folder(path: str, key: str, what: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UserError(f"{key}={path} does not exist: give the folder holding {what}")
    if not folder.is_dir():
        raise UserError(f"{key}={path} is a file, not a folder: give the folder holding {what}")
    return folder


def support_files(path: str) -> tuple[list[str], list[list[Path]]]:
    """Class names (sorted folder names) and each class's image files, from ``support/<class_name>/*``."""
    what = "one folder of images per class (support/<class_name>/*.png)"
    root = _folder(path, "support", what)
    entries = _visible(root)
    stray = [p for p in entries if not p.is_dir()]
    if stray:
        raise UserError(f"support={path} holds a file ({stray[0].name}) beside the class folders: put each image in "
                        f"its class's folder, support/<class_name>/")
    if not entries:
        raise UserError(f"support={path} holds no class folders: put each class's images in support/<class_name>/")
    if len(entries) == 1:
        raise UserError(f"support={path} holds a single class ({entries[0].name}): few-shot prediction chooses among "
                        f"2 classes or more; add a folder per class")
    files = []
    for d in entries:
        inside = _visible(d)
        if any(p.is_dir() for p in inside):
            sub = next(p for p in inside if p.is_dir())
            raise UserError(f"support class folder {d} holds a folder ({sub.name}): put the class's images directly in it")
        if not inside:
            raise UserError(f"support class folder {d} is empty: add at least one image of {d.name}, or remove the folder")
        files.append(inside)
    return [d.name for d in entries], files


def query_files(path: str) -> list[Path]:
    """The image files of ``query/`` (sorted by name; hidden files left out)."""
    root = _folder(path, "query", "the images to classify")
    entries = _visible(root)
    sub = [p for p in entries if p.is_dir()]
    if sub:
        raise UserError(f"query={path} holds a folder ({sub[0].name}): put the images to classify directly in query/")
    if not entries:
        raise UserError(f"query={path} holds no images: put the images to classify in it")
    return entries


def read_images(files: list[Path], spec, role: str) -> torch.Tensor:
    """uint8 (len(files), C, H, W): each file converted by the data set's ``ImageSpec``."""
    import numpy as np
    from PIL import Image

    out = np.empty((len(files), *spec.x_shape), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im.load()
                out[i] = spec.convert(im)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            raise UserError(f"{role} file {f} is not an image PIL can read ({why}): remove it or replace it "
                            f"with a PNG or JPEG") from None
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- the model
def _load_model(saved: DictConfig, state: dict, checkpoint: str, support: str, x_shape: tuple[int, ...], n_way: int,
                runtime, given_size: bool):
    """The checkpoint's learner (``saved``: its config), built for ``x_shape`` images, its weights loaded, checked
    for ``n_way`` support classes, in eval mode."""
    from fewshot_runner.engine.build import build_learner
    from fewshot_runner.engine.ema import eval_weights
    from fewshot_runner.engine.eval_checkpoint import _built_from
    from fewshot_runner.errors import CheckpointError

    size = "x".join(str(s) for s in x_shape[1:])
    fix = ("leave image_size out (the checkpoint's data.image_size)" if given_size
           else "predict with the fewshot version that wrote the checkpoint")
    train_n_way = state["config"]["data"].get("train_n_way") or state["config"]["data"]["n_way"]
    try:
        with _built_from(checkpoint, state):
            algo = build_learner(saved, x_shape, train_n_way, runtime)
    except (RuntimeError, ValueError) as e:  # the backbone's trial forward on x_shape (build_learner measures it)
        raise UserError(f"the model cannot take {size} images ({str(e).splitlines()[0][:160]}); {fix}") from None
    try:
        algo.load_state_dict(eval_weights(state))
    except RuntimeError as e:
        if given_size:
            raise UserError(f"the model cannot take {size} images: its weights are sized for the checkpoint's "
                            f"data.image_size; {fix}") from None
        raise CheckpointError(f"checkpoint {checkpoint} does not match its own config's model "
                              f"({str(e).splitlines()[0]}); it may come from another version of fewshot") from None
    try:
        algo.check_n_way(n_way)
    except UserError as e:
        raise UserError(f"support={support} holds {n_way} classes but {str(e).split(';')[0]}; give support/ "
                        f"{train_n_way} class folders") from None
    algo.eval()
    return algo


def _scores(algo, support_x, support_y, query_x, n_way: int, runtime, transform, size: str) -> torch.Tensor:
    """Softmax probabilities (Q, n_way) of the queries, ``QUERY_CHUNK`` at a time against the same support set."""
    from fewshot_runner.episode import Episode

    out = []
    for start in range(0, query_x.shape[0], QUERY_CHUNK):
        q = query_x[start:start + QUERY_CHUNK]
        ep = Episode(support_x[None], support_y[None], q[None], torch.zeros(1, q.shape[0], dtype=torch.long), n_way)
        ep = ep.to(runtime.device)
        if transform is not None:
            ep = ep.map_inputs(transform)
        try:
            with torch.no_grad(), runtime.autocast():
                logits = algo.predict(ep)
        except (RuntimeError, ValueError) as e:  # (torch's shape errors; the fused kernels' ValueError)
            raise UserError(f"the model cannot take {size} images ({str(e).splitlines()[0][:160]}); leave image_size "
                            f"out (the checkpoint's data.image_size)") from None
        out.append(torch.softmax(logits[0].float(), -1).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------- outputs
def write_csv(path: Path, files: list[str], class_names: list[str], probs: torch.Tensor) -> None:
    """``file,predicted_class,probability`` then a column per class; one row per query, header first."""
    best = probs.argmax(-1)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "predicted_class", "probability", *class_names])
        for name, k, row in zip(files, best.tolist(), probs.tolist()):
            w.writerow([name, class_names[k], f"{row[k]:.8g}", *(f"{p:.8g}" for p in row)])


def _csv_path(cfg: DictConfig, run_dir: Path) -> Path:
    if cfg.get("out") in (None, ""):
        return run_dir / CSV_FILE
    out = Path(str(cfg.out)).expanduser()
    if out.is_dir():
        raise UserError(f"out={cfg.out} is a folder: give the CSV file to write, e.g. out={Path(cfg.out) / CSV_FILE}")
    if not out.parent.is_dir():
        raise UserError(f"out={cfg.out}: the folder {out.parent} does not exist; create it or choose another out=")
    return out


def _table(files: list[str], class_names: list[str], probs: torch.Tensor, csv_path: Path) -> None:
    from rich.table import Table

    from fewshot_runner.engine.console import console

    table = Table(title=f"{len(files)} queries, {len(class_names)} classes")
    for col, just in (("file", "left"), ("predicted class", "left"), ("probability", "right")):
        table.add_column(col, justify=just)
    best = probs.max(-1)
    for name, p, k in list(zip(files, best.values.tolist(), best.indices.tolist()))[:TABLE_ROWS]:
        table.add_row(name, class_names[k], f"{p:.3f}")
    console.print(table)
    more = f" ({len(files) - TABLE_ROWS} more rows)" if len(files) > TABLE_ROWS else ""
    console.print(f"predictions: {csv_path}{more}")


# ----------------------------------------------------------------------------- the command
def predict(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Classify ``cfg.query``'s images among ``cfg.support``'s classes with ``cfg.checkpoint``'s learner; returns
    ``{"csv", "picture", "classes", "files", "probabilities" (Q, n_way)}``."""
    from fewshot_runner.data.decode import image_spec
    from fewshot_runner.engine import checkpoint as ckpt
    from fewshot_runner.engine.build import build_transforms, run_runtime
    from fewshot_runner.engine.eval_checkpoint import apply_eval_settings, with_device
    from fewshot_runner.engine.rundir import make_run_dir
    from fewshot_runner.plots_episodes import draw_episode

    class_names, class_files = support_files(str(cfg.support))
    queries = query_files(str(cfg.query))
    state = ckpt.load_checkpoint(cfg.checkpoint)
    ckpt.check_targets(state, cfg.checkpoint)
    saved = with_device(OmegaConf.create(state["config"]), cfg.device)
    apply_eval_settings(saved, cfg.get("algo") or {})
    if cfg.get("image_size") is not None:
        if cfg.image_size < 1:
            raise UserError(f"image_size={cfg.image_size} must be a positive integer (or leave it out)")
        OmegaConf.update(saved, "data.image_size", int(cfg.image_size), force_add=True)
    spec = image_spec(saved.data)
    support_x = read_images([f for files in class_files for f in files], spec, "support")
    support_y = torch.cat([torch.full((len(files),), c, dtype=torch.long) for c, files in enumerate(class_files)])
    query_x = read_images(queries, spec, "query")
    run_dir = make_run_dir(run_dir)
    csv_path = _csv_path(cfg, run_dir)
    runtime = run_runtime(cfg.device)
    n_way = len(class_names)
    algo = _load_model(saved, state, str(cfg.checkpoint), str(cfg.support), spec.x_shape, n_way, runtime,
                       cfg.get("image_size") is not None)
    _, eval_tf = build_transforms(saved.data, channels=spec.channels)
    torch.manual_seed(int(cfg.get("seed") or 0))
    size = f"{spec.height}x{spec.width}"
    probs = _scores(algo, support_x, support_y, query_x, n_way, runtime, eval_tf, size)
    names = [q.name for q in queries]
    write_csv(csv_path, names, class_names, probs)
    picture = run_dir / PICTURE_FILE
    try:
        draw_episode(picture, support_x, support_y, query_x, probs.argmax(-1), probs.max(-1).values, class_names,
                     query_names=names, title=f"fewshot predict: {len(names)} queries, {n_way} classes "
                                              f"({Path(str(cfg.checkpoint)).name})")
    except ImportError:
        picture = None
    _table(names, class_names, probs, csv_path)
    return {"csv": csv_path, "picture": picture, "classes": class_names, "files": names, "probabilities": probs}
