"""Linear evaluation of a frozen teacher, as the DINO paper does it (Caron et al. 2021, Sec. 4.1 and App. B).

Protocol (reference code: facebookresearch/dino ``eval_linear.py``):

* The backbone is frozen (eval mode, no gradient). Its feature for a ViT is the ``[CLS]`` token of each
  of the last ``n_last_blocks`` blocks, each passed through the final norm, concatenated (reference:
  ``n = 4`` for ViT-S); optionally (``avgpool``, reference: with ``n = 1`` for ViT-B) followed by the
  mean of the last block's normed patch tokens. Layout ``[cls_{L-n+1} .. cls_L, avg_L]``, as DINOv2's
  ``create_linear_input`` (DINO interleaves CLS and average for ``n = 1``: the same features permuted,
  the same linear classifier up to a permutation of its inputs). A ConvNet's feature is its pooled
  output (``num_classes=0``).
* One ``nn.Linear`` on top, weights ``N(0, 0.01^2)``, bias 0, cross-entropy, SGD momentum 0.9, weight
  decay 0, learning rate ``base_lr * batch / 256`` (reference ``base_lr`` 0.001, batch 1024 = 8 x 128)
  following a per-epoch cosine to 0 (``CosineAnnealingLR(epochs, eta_min=0)``), 100 epochs.
* Evaluation: top-1 / top-5 on the validation split's centre views (shorter side to 256/224 of the
  input size, bicubic, centre crop: :func:`dino.eval_view.center_view`).

Two modes:

* ``augment`` (the paper's): every epoch re-reads the training split and draws a fresh view per image,
  ``RandomResizedCrop(image_size)`` (scale 0.08-1, ratio 3/4-4/3) + horizontal flip, through the frozen
  backbone. Costs one backbone forward per image per epoch: a GPU job.
* ``features``: the centre view of every training image goes through the backbone once; the classifier
  is trained on these cached features with no augmentation. An epoch is a matrix product, so the probe
  runs in seconds on a laptop. The classifier sees one view per image instead of a new crop each epoch:
  on large datasets it reads usually a little lower than ``augment`` (it overfits the fixed views
  sooner), on small ones sometimes a little higher (train and test views then come from the same
  distribution). Compare runs of the same mode.

Data: the project's own shard reader (:func:`pipeline.data.tar_reader.read_shard_tables`) and evaluation
view (:func:`pipeline.eval.embed.decode_views`), in this process; the validation features are computed once
in both modes. The training stream of ``augment`` is shuffled by shard order (per epoch) and a shuffle
buffer, as webdataset loaders do.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.data.shards import DEFAULT_MEMBERS, Members, SplitInfo
from pipeline.errors import DataError
from pipeline.eval.embed import META_COLUMNS, BackboneSpec, build_backbone, collect, decode_views
from pipeline.eval.knn import check_labels

log = logging.getLogger(__name__)

MODES = ("augment", "features")
FORMAT = "dino-linear-probe/1"
REFERENCE_BASE_LR = 0.001
TRAIN_SCALE = (0.08, 1.0)  # RandomResizedCrop defaults (the reference's training view)
TRAIN_RATIO = (3 / 4, 4 / 3)


# ---------------------------------------------------------------------------------------------- features


@dataclass(frozen=True)
class FeatureLayout:
    """What the classifier's input is. ``kind`` "vit": ``n_last_blocks`` normed CLS tokens (+ patch mean);
    "pooled": the backbone's pooled output (ConvNets; ``n_last_blocks`` 0, ``avgpool`` False)."""

    kind: str
    n_last_blocks: int
    avgpool: bool
    block_dim: int  # width of one token / of the pooled output
    dim: int  # classifier input width: (n_last_blocks + avgpool) * block_dim for a ViT


def is_token_model(model: nn.Module) -> bool:
    """A timm ViT-like model: blocks, a final norm and ``forward_intermediates`` (ViT, DeiT, EVA)."""
    return all(hasattr(model, a) for a in ("blocks", "norm", "forward_intermediates", "num_prefix_tokens"))


def feature_layout(model: nn.Module, n_last_blocks: int = 4, avgpool: bool = False) -> FeatureLayout:
    """The layout for ``model``; a one-line ValueError for a request the model cannot serve."""
    width = int(model.num_features)
    if not is_token_model(model):
        if avgpool:
            raise ValueError(
                f"--avgpool applies to ViTs (patch tokens); {type(model).__name__} has a pooled output only"
            )
        return FeatureLayout("pooled", 0, False, width, width)
    depth = len(model.blocks)
    if not 1 <= n_last_blocks <= depth:
        raise ValueError(f"n_last_blocks must be in 1..{depth} (the model's depth), got {n_last_blocks}")
    if getattr(model, "cls_token", None) is None:
        raise ValueError(f"{type(model).__name__} has no [CLS] token (class_token=False): nothing to concatenate")
    return FeatureLayout("vit", n_last_blocks, avgpool, width, (n_last_blocks + int(avgpool)) * width)


@torch.no_grad()  # not inference_mode: the features feed a classifier trained by autograd
def extract_features(model: nn.Module, x: Tensor, layout: FeatureLayout) -> Tensor:
    """Frozen features of normalised images ``x`` ``(B, 3, H, W)`` -> ``(B, layout.dim)`` float32.

    ViT: ``forward_intermediates`` on the last ``n`` blocks with the final norm applied to each; token 0
    of each block's prefix is its CLS. Not L2-normalised (the reference feeds the raw features).
    """
    if layout.kind == "pooled":
        return model(x).float()
    outs = model.forward_intermediates(
        x,
        indices=layout.n_last_blocks,
        return_prefix_tokens=True,
        norm=True,
        output_fmt="NLC",
        intermediates_only=True,
        stop_early=True,
    )  # n x (patch (B, L, D), prefix (B, P, D)), oldest block first
    parts = [prefix[:, 0] for _, prefix in outs]  # n x (B, D)
    if layout.avgpool:
        parts.append(outs[-1][0].mean(dim=1))  # (B, D): mean over the last block's L patch tokens
    return torch.cat(parts, dim=-1).float()  # (B, (n + avgpool) D)


def features_of_views(model: nn.Module, views: np.ndarray | Tensor, layout: FeatureLayout, device) -> Tensor:
    """uint8 views ``(B, S, S, 3)`` -> ``(B, layout.dim)`` float32 on the CPU (normalised on ``device``)."""
    from dino.crops import crops_to_input

    views = torch.as_tensor(np.ascontiguousarray(views))
    if len(views) == 0:
        return torch.zeros(0, layout.dim)
    return extract_features(model, crops_to_input(views[:, None], device), layout).cpu()


# -------------------------------------------------------------------------------------------- classifier


class LinearClassifier(nn.Module):
    """``nn.Linear(dim, num_classes)``, weights ``N(0, 0.01^2)``, bias 0 (the reference's initialisation)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: Tensor) -> Tensor:  # (B, D) -> (B, C) logits
        return self.linear(x.flatten(1))


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule of the reference: ``base_lr * batch / 256``."""
    return base_lr * batch_size / 256.0


def lr_per_epoch(base_lr: float, batch_size: int, epochs: int) -> np.ndarray:
    """``[epochs]`` learning rates: a cosine from :func:`scaled_lr` to 0 over the epochs, as
    ``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped once per epoch (epoch ``e``:
    ``0.5 lr (1 + cos(pi e / epochs))``)."""
    from dino.schedules import cosine_schedule

    return cosine_schedule(scaled_lr(base_lr, batch_size), 0.0, epochs)


def topk_accuracy(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """``{"top1": %, "top5": %}`` (top-5 clamped to the class count)."""
    from dino.knn import knn_accuracy

    acc = knn_accuracy(logits, labels, topk=(1, 5))
    return {"top1": acc[1], "top5": acc[5]}


@torch.no_grad()
def evaluate(classifier: nn.Module, features: Tensor, labels: Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Top-1/top-5 of ``classifier`` on ``(N, D)`` features."""
    device = next(classifier.parameters()).device
    logits = torch.cat(
        [classifier(features[i : i + batch_size].to(device)).cpu() for i in range(0, len(features), batch_size)]
    )
    return topk_accuracy(logits, labels)


@dataclass(frozen=True)
class ProbeSettings:
    """The probe's recipe (defaults: the reference's, batch = 8 GPUs x 128)."""

    mode: str = "features"
    epochs: int = 100
    base_lr: float = REFERENCE_BASE_LR
    batch_size: int = 1024
    n_last_blocks: int = 4
    avgpool: bool = False
    image_size: int | None = None  # None: the teacher's
    seed: int = 0
    shuffle_buffer: int = 2048  # augment mode: samples held for shuffling the training stream

    def validate(self) -> ProbeSettings:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.n_last_blocks < 1:
            raise ValueError(
                f"epochs, batch size and n_last_blocks must be >= 1, "
                f"got {self.epochs}, {self.batch_size}, {self.n_last_blocks}"
            )
        if not (self.base_lr > 0 and math.isfinite(self.base_lr)):
            raise ValueError(f"the learning rate must be a positive number, got {self.base_lr}")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image size must be >= 8 px, got {self.image_size}")
        return self


@dataclass
class ProbeResult:
    """One trained classifier and how it did."""

    classifier: LinearClassifier
    top1: float
    top5: float
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: lr, train_loss, val_top1, val_top5


Batches = Callable[[int], Iterable[tuple[dict[str, Tensor], Tensor]]]  # epoch -> ({model: (B, D)}, (B,) labels)


def train_linear(
    batches: Batches,
    val: dict[str, tuple[Tensor, Tensor]],
    dims: dict[str, int],
    num_classes: int,
    settings: ProbeSettings,
    on_epoch: Callable[[int, dict[str, dict[str, float]]], None] | None = None,
) -> dict[str, ProbeResult]:
    """Train one linear classifier per model on the same batches; evaluate each on ``val`` every epoch.

    Args:
        batches: ``epoch -> iterable of ({model: (B, D_model) features}, (B,) labels)``.
        val: ``{model: ((N, D_model) features, (N,) labels)}``.
        dims: ``{model: D_model}``.
        num_classes: ``C``, the classifier's outputs.
        settings: epochs, learning rate, batch size (for the scaling rule), seed.
        on_epoch: called after each epoch with ``{model: {"lr", "train_loss", "val_top1", "val_top5"}}``.

    Returns:
        ``{model: ProbeResult}``; ``top1``/``top5`` are the last epoch's (the reference prints the best
        epoch's too, a choice made on the evaluation split; the history keeps every epoch).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lrs = lr_per_epoch(settings.base_lr, settings.batch_size, settings.epochs)
    heads, optims, results = {}, {}, {}
    for i, name in enumerate(sorted(dims)):
        torch.manual_seed(settings.seed + i)
        heads[name] = LinearClassifier(dims[name], num_classes).to(device)
        optims[name] = torch.optim.SGD(heads[name].parameters(), lr=float(lrs[0]), momentum=0.9, weight_decay=0.0)
        results[name] = ProbeResult(heads[name], 0.0, 0.0)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(settings.epochs):
        for opt in optims.values():
            for group in opt.param_groups:
                group["lr"] = float(lrs[epoch])
        sums, seen = dict.fromkeys(heads, 0.0), 0
        for feats, labels in batches(epoch):
            if len(labels) and int(labels.max()) >= num_classes:
                raise DataError(f"training label {int(labels.max())} outside the {num_classes} classes of the dataset")
            labels = labels.to(device)
            for name, head in heads.items():
                head.train()
                loss = loss_fn(head(feats[name].to(device)), labels)
                optims[name].zero_grad(set_to_none=True)
                loss.backward()
                optims[name].step()
                sums[name] += loss.item() * len(labels)
            seen += len(labels)
        if seen == 0:
            raise DataError("the training split yielded no decodable, labelled image in an epoch")
        report = {}
        for name, head in heads.items():
            head.eval()
            acc = evaluate(head, *val[name])
            row = {
                "lr": float(lrs[epoch]),
                "train_loss": sums[name] / seen,
                "val_top1": acc["top1"],
                "val_top5": acc["top5"],
            }
            results[name].history.append(row)
            results[name].top1, results[name].top5 = acc["top1"], acc["top5"]
            report[name] = row
        log.info(
            "epoch %d/%d lr %.3g  %s",
            epoch + 1,
            settings.epochs,
            lrs[epoch],
            "  ".join(f"{n}: loss {r['train_loss']:.4f} top-1 {r['val_top1']:.2f}" for n, r in report.items()),
        )
        if on_epoch is not None:
            on_epoch(epoch, report)
    for r in results.values():
        r.classifier = r.classifier.cpu().eval()
    return results


def cached_batches(train: dict[str, tuple[Tensor, Tensor]], batch_size: int, seed: int) -> Batches:
    """``features`` mode: minibatches of cached features, reshuffled each epoch (seeded by ``seed``, epoch).
    All models' features share their row order (one pass embedded them together)."""
    labels = next(iter(train.values()))[1]

    def epoch_batches(epoch: int) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            yield {name: f[rows] for name, (f, _) in train.items()}, labels[rows]

    return epoch_batches


# ------------------------------------------------------------------------------------------------- data


def _raw_batches(paths: list[str], rows: int, layout: Members = DEFAULT_MEMBERS) -> Iterator[dict[str, np.ndarray]]:
    """Shard rows as dicts of object columns, ``rows`` at a time: the reader ``embed_in_process`` uses."""
    from pipeline.data.storage import filesystem_for
    from pipeline.data.tar_reader import read_shard_tables

    for t in read_shard_tables({"path": paths}, filesystem_for(paths), rows_per_table=rows, layout=layout):
        yield {c: np.array(t.column(c).to_pylist(), dtype=object) for c in t.column_names}


def embed_center_views(
    splits: dict[str, SplitInfo], models: dict[str, tuple[nn.Module, FeatureLayout]], image_size: int, batch_size: int
) -> dict[str, dict[str, Any]]:
    """Probe features of every split's centre views, every model, one pass: ``{model: {split: Embeddings}}``.

    Reads each shard once (a shard in two splits too), decodes each image once
    (:func:`pipeline.eval.embed.decode_views`); rows sorted by key, unlabelled rows kept (label -1).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = {name: (m.to(device).eval(), lay) for name, (m, lay) in models.items()}
    paths = sorted({p for info in splits.values() for p in info.paths})
    layout = next(iter(splits.values())).members

    def batches():
        for raw in _raw_batches(paths, batch_size, layout):
            b = decode_views(raw, image_size)
            out = {c: b[c] for c in META_COLUMNS}
            for name, (model, lay) in models.items():
                out[f"feature_{name}"] = features_of_views(model, b["view"], lay, device).numpy()
            yield out

    t0 = time.perf_counter()
    emb = collect(batches(), splits, list(models))
    n = sum(len(e) for e in next(iter(emb.values())).values())
    log.info("probe features of %d centre view(s) in %.1f s", n, time.perf_counter() - t0)
    return emb


def train_views(batch: dict[str, Any], image_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Raw shard rows -> ``view`` uint8 ``(B, S, S, 3)`` random-resized crops, each flipped with p 0.5,
    + ``label`` + ``unlabelled`` (a count). Imageless, undecodable and unlabelled samples are skipped."""
    from dino.augment import crop_box, decode_image, hflip, resized_crop
    from pipeline.data.stage import _label, image_bytes

    n = len(batch["__key__"])
    views, labels, unlabelled = [], [], 0
    for data, label, error in zip(image_bytes(batch), batch.get("cls", [None] * n), batch.get("__error__", [None] * n)):
        y = _label(label)
        if isinstance(error, str) or not data:
            continue
        if y < 0:
            unlabelled += 1
            continue
        try:
            img = np.asarray(decode_image(bytes(data)).convert("RGB"))  # (H, W, 3)
        except Exception:  # corrupt / truncated / not an image
            continue
        box = crop_box(rng.random(40).tolist(), (img.shape[1], img.shape[0]), TRAIN_SCALE, TRAIN_RATIO)
        view = resized_crop(img, box, image_size)
        views.append(hflip(view) if rng.random() < 0.5 else view)
        labels.append(y)
    return {
        "view": np.stack(views) if views else np.zeros((0, image_size, image_size, 3), np.uint8),
        "label": np.array(labels, dtype=np.int64),
        "unlabelled": unlabelled,
    }


def split_labels(info: SplitInfo) -> np.ndarray:
    """Every label of a split (one read of its shards; the images are not decoded). For ``augment`` mode
    on a dataset without a class list, where the class count is otherwise unknown before training."""
    from pipeline.data.stage import _label

    return np.array(
        [_label(c) for raw in _raw_batches(info.paths, 256, info.members) for c in raw.get("cls", [])], dtype=np.int64
    )


def augmented_batches(
    info: SplitInfo, models: dict[str, tuple[nn.Module, FeatureLayout]], image_size: int, settings: ProbeSettings
) -> Batches:
    """``augment`` mode: each epoch reads the split (shard order shuffled per epoch), draws a fresh training
    view per image, shuffles through a buffer of ``settings.shuffle_buffer`` samples, and yields the frozen
    models' features of ``batch_size`` views at a time."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = {name: (m.to(device).eval(), lay) for name, (m, lay) in models.items()}

    def epoch_batches(epoch: int) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        rng = np.random.default_rng([settings.seed, epoch])
        paths = [info.paths[i] for i in rng.permutation(len(info.paths))]
        pool: list[tuple[np.ndarray, int]] = []  # (view (S, S, 3), label): the shuffle buffer

        def take(k: int) -> tuple[dict[str, Tensor], Tensor]:
            picks = []
            for _ in range(min(k, len(pool))):  # uniform draw without replacement, O(1) each
                i = int(rng.integers(len(pool)))
                pool[i], pool[-1] = pool[-1], pool[i]
                picks.append(pool.pop())
            views = np.stack([v for v, _ in picks])  # (B, S, S, 3) uint8
            feats = {name: features_of_views(m, views, lay, device) for name, (m, lay) in models.items()}
            return feats, torch.tensor([y for _, y in picks], dtype=torch.long)

        for raw in _raw_batches(paths, 64, info.members):
            b = train_views(raw, image_size, rng)
            if b["unlabelled"]:
                raise DataError(
                    f"{info.describe()}: {b['unlabelled']} sample(s) without a label ({info.members.label_words()}) "
                    f"in {raw['__url__'][0]}; {PROBE_NEEDS}"
                )
            pool.extend(zip(b["view"], b["label"].tolist()))
            while len(pool) >= max(settings.shuffle_buffer, settings.batch_size):
                yield take(settings.batch_size)
        while pool:
            yield take(settings.batch_size)

    return epoch_batches


PROBE_NEEDS = "the linear probe needs labelled training and evaluation sources"


# ------------------------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class ProbeRequest:
    """What to evaluate and where results go: the classifier trains on ``train_split`` of ``data_root`` (all of it
    when it has no split names) and is evaluated on ``val_split`` of ``val_root`` (default ``data_root``);
    ``layout``: the samples' image and label members (``data.image_keys``, ``data.label_key``)."""

    teacher_dir: Path
    data_root: str | list[str]
    train_split: str | None
    val_split: str | None
    out_dir: Path
    tracking_uri: str | None  # None: no MLflow
    pretrain_run_id: str | None
    random_init: bool = False
    val_root: str | list[str] | None = None
    layout: Members = DEFAULT_MEMBERS

    def sources(self) -> tuple[SplitInfo, SplitInfo]:
        """The training and evaluation sources, counted (:mod:`pipeline.data.sources`); a one-line error when the
        evaluation source would be the training collection itself by default."""
        from pipeline.data.sources import ensure_counted, resolve_source

        train = ensure_counted(resolve_source(self.data_root, self.train_split, members=self.layout))
        val = ensure_counted(resolve_source(self.val_root or self.data_root, self.val_split, members=self.layout))
        if self.val_root is None and val.split is None:
            raise DataError(
                f"{train.describe()} has no split names: pass the evaluation source separately "
                f"(--val-data); a collection is never its own evaluation set"
            )
        return train, val


def run_probe(req: ProbeRequest, settings: ProbeSettings) -> dict[str, Any]:
    """Load the teacher (and its random-init twin), read the splits, train + evaluate, save, log to MLflow.

    Returns ``{"teacher": {"top1", "top5", "history"}, "random_init": ... (if asked), "out_dir",
    "mlflow_run_id", "num_classes", "n_train", "n_val", "settings"}`` (accuracies in percent).
    """
    from pipeline.weights.checkpoint import TEACHER_WEIGHTS, load_teacher
    from pipeline.weights.teacher_source import file_sha256

    settings.validate()
    teacher, meta = load_teacher(req.teacher_dir)
    image_size = settings.image_size or int(meta["image_size"])
    models = {"teacher": (teacher, feature_layout(teacher, settings.n_last_blocks, settings.avgpool))}
    if req.random_init:
        interp = meta.get("pos_embed_interp", "timm")
        spec = BackboneSpec(meta["arch"], meta["timm_kwargs"], image_size, seed=settings.seed, pos_embed_interp=interp)
        rnd = build_backbone(spec, None)
        models["random_init"] = (rnd, models["teacher"][1])
    train, val = req.sources()
    if val.paths == train.paths:
        log.warning("the evaluation source is the training source (%s): accuracies are optimistic", train.describe())
    classes = train.classes
    tr, va = "train", "val"
    want = {va: val} if settings.mode == "augment" else {tr: train, va: val}  # augment: training views per epoch
    emb = embed_center_views(want, models, image_size, batch_size=min(settings.batch_size, 256))
    v = emb["teacher"][va]
    check_labels(v, val, classes, PROBE_NEEDS)
    val_feats = {n: (torch.from_numpy(e[va].features), torch.from_numpy(v.labels)) for n, e in emb.items()}
    if settings.mode == "features":
        t = emb["teacher"][tr]
        check_labels(t, train, classes, PROBE_NEEDS)
        train_feats = {n: (torch.from_numpy(e[tr].features), torch.from_numpy(t.labels)) for n, e in emb.items()}
        batches, n_train = cached_batches(train_feats, settings.batch_size, settings.seed), len(t)
        train_labels = t.labels
    else:
        batches, n_train = augmented_batches(train, models, image_size, settings), train.count
        train_labels = np.zeros(0, np.int64) if classes else split_labels(train)
    num_classes = len(classes) if classes else int(max(train_labels.max(initial=0), v.labels.max())) + 1
    dims = {n: lay.dim for n, (_, lay) in models.items()}

    tracker = _ProbeTracker.start(req, settings, meta, dims["teacher"], n_train, len(v))
    t0 = time.perf_counter()
    try:
        results = train_linear(batches, val_feats, dims, num_classes, settings, on_epoch=tracker.log_epoch)
    except BaseException:
        tracker.close("FAILED")
        raise
    train_s = time.perf_counter() - t0
    layout = models["teacher"][1]
    doc = {
        "arch": meta["arch"],
        "timm_kwargs": meta["timm_kwargs"],
        "image_size": image_size,
        "layout": asdict(layout),
        "num_classes": num_classes,
        "classes": classes,
        "settings": asdict(settings),
        "data_root": train.source,
        "train_split": train.split,
        "val_root": val.source,
        "val_split": val.split,
        "run_id": req.pretrain_run_id,
        "teacher_dir": str(Path(req.teacher_dir).absolute()),
        "teacher_sha256": file_sha256(Path(req.teacher_dir) / TEACHER_WEIGHTS),
    }
    out: dict[str, Any] = {
        "out_dir": str(req.out_dir),
        "num_classes": num_classes,
        "n_train": n_train,
        "n_val": len(v),
        "train": train.describe(),
        "val": val.describe(),
        "settings": asdict(settings),
        "train_s": train_s,
        "feature_dim": layout.dim,
    }
    for name in ("teacher", "random_init"):  # no stale baseline from an earlier run in the folder
        if name not in results:
            for f in classifier_files(req.out_dir, name):
                f.unlink(missing_ok=True)
    for name, r in results.items():
        save_classifier(req.out_dir, name, r.classifier, {**doc, "model": name, "top1": r.top1, "top5": r.top5})
        out[name] = {
            "top1": r.top1,
            "top5": r.top5,
            "best_top1": max(h["val_top1"] for h in r.history),
            "history": r.history,
        }
    out["mlflow_run_id"] = tracker.finish(out)
    return out


# ------------------------------------------------------------------------------------- classifier files


def classifier_files(out_dir: str | Path, name: str = "teacher") -> tuple[Path, Path]:
    """``(<out>/linear_<name>.safetensors, <out>/linear_<name>.json)``."""
    d = Path(out_dir)
    return d / f"linear_{name}.safetensors", d / f"linear_{name}.json"


def save_classifier(out_dir: str | Path, name: str, classifier: LinearClassifier, meta: dict[str, Any]) -> Path:
    """Weights (safetensors: ``weight`` (C, D), ``bias`` (C,)) and a JSON of layout, classes and results,
    each written to a temporary name and renamed."""
    from safetensors.torch import save_file

    from pipeline.weights.checkpoint import _atomic_write

    weights_path, meta_path = classifier_files(out_dir, name)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in classifier.linear.state_dict().items()}
    _atomic_write(weights_path, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    _atomic_write(meta_path, lambda p: p.write_text(json.dumps({"format": FORMAT, **meta}, indent=2, sort_keys=True)))
    return weights_path


def load_classifier(out_dir: str | Path, name: str = "teacher") -> tuple[LinearClassifier, dict[str, Any]]:
    """The classifier :func:`save_classifier` wrote, in eval mode, and its JSON."""
    from safetensors.torch import load_file

    weights_path, meta_path = classifier_files(out_dir, name)
    if not weights_path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(
            f"no linear classifier {name!r} in {out_dir} (need {weights_path.name} and {meta_path.name})"
        )
    meta = json.loads(meta_path.read_text())
    weights = load_file(str(weights_path))
    clf = LinearClassifier(meta["layout"]["dim"], meta["num_classes"])
    clf.linear.load_state_dict(weights)
    return clf.eval(), meta


# ----------------------------------------------------------------------------------------------- MLflow


class _ProbeTracker:
    """The probe's MLflow run: a child of the pretraining run (in its experiment) or a run in ``dino-linear``.
    Tracking failures are logged as warnings and never stop the probe."""

    def __init__(self, client=None, run_id: str | None = None, parent: str | None = None):
        self.client, self.run_id, self.parent = client, run_id, parent

    @classmethod
    def start(
        cls, req: ProbeRequest, settings: ProbeSettings, meta: dict[str, Any], dim: int, n_train: int, n_val: int
    ) -> _ProbeTracker:
        if not req.tracking_uri:
            return cls()
        from mlflow.entities import Param

        from pipeline.tracking import mlflow_client, redact

        try:
            client = mlflow_client(req.tracking_uri)
            tags, exp_id, parent = {"dino.kind": "linear"}, None, req.pretrain_run_id
            run_name = "linear"
            if parent:
                try:
                    p = client.get_run(parent)
                    exp_id, run_name = p.info.experiment_id, f"{p.info.run_name}-linear"
                    tags.update({"mlflow.parentRunId": parent, "dino.pretrain_run_id": parent})
                except Exception as e:
                    log.warning(
                        "pretraining run %s not found at %s (%s): logging to experiment dino-linear",
                        parent,
                        req.tracking_uri,
                        type(e).__name__,
                    )
                    tags["dino.pretrain_run_id"], parent = req.pretrain_run_id, None
            if exp_id is None:
                from pipeline.tracking import model_training_experiment

                exp_id = model_training_experiment(client, "dino-linear")
            rid = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
            params = {
                "mode": settings.mode,
                "n_last_blocks": settings.n_last_blocks,
                "avgpool": settings.avgpool,
                "epochs": settings.epochs,
                "base_lr": settings.base_lr,
                "lr": scaled_lr(settings.base_lr, settings.batch_size),
                "batch_size": settings.batch_size,
                "seed": settings.seed,
                "image_size": settings.image_size or meta["image_size"],
                "arch": meta["arch"],
                "feature_dim": dim,
                "data_root": req.data_root,
                "train_split": req.train_split,
                "val_root": req.val_root or req.data_root,
                "val_split": req.val_split,
                "n_train": n_train,
                "n_val": n_val,
                "random_init": req.random_init,
            }
            client.log_batch(rid, params=[Param(k, str(v)) for k, v in redact(params).items()])
            return cls(client, rid, parent)
        except Exception as e:
            log.warning("linear probe not tracked in MLflow at %s: %s: %s", req.tracking_uri, type(e).__name__, e)
            return cls()

    @staticmethod
    def _prefix(name: str) -> str:
        return "linear" if name == "teacher" else f"linear_{name}"

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if self.client is None:
            return
        now = int(time.time() * 1000)
        try:
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])
        except Exception as e:
            log.warning("MLflow metrics not logged: %s: %s", type(e).__name__, e)

    def log_epoch(self, epoch: int, report: dict[str, dict[str, float]]) -> None:
        values = {}
        for name, row in report.items():
            p = self._prefix(name)
            values |= {f"{p}/train_loss": row["train_loss"], f"{p}/val_top1": row["val_top1"], f"{p}/lr": row["lr"]}
        self._metrics(values, epoch)

    def finish(self, out: dict[str, Any]) -> str | None:
        if self.client is None:
            return None
        values = {"linear/train_s": out["train_s"]}
        for name in ("teacher", "random_init"):
            if name in out:
                p = self._prefix(name)
                values |= {
                    f"{p}/top1": out[name]["top1"],
                    f"{p}/top5": out[name]["top5"],
                    f"{p}/best_top1": out[name]["best_top1"],
                }
        self._metrics(values, len(out["teacher"]["history"]))
        try:
            self.client.log_artifacts(self.run_id, out["out_dir"], artifact_path="linear")
            if self.parent:  # the headline on the pretraining run too, beside knn_top1
                self._log_parent(out)
            self.client.set_terminated(self.run_id, "FINISHED")
        except Exception as e:
            log.warning("MLflow artifacts not logged to run %s: %s: %s", self.run_id, type(e).__name__, e)
        return self.run_id

    def close(self, status: str) -> None:
        if self.client is not None:
            try:
                self.client.set_terminated(self.run_id, status)
            except Exception as e:
                log.warning("MLflow run %s not closed: %s: %s", self.run_id, type(e).__name__, e)

    def _log_parent(self, out: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.parent, metrics=[Metric(f"linear/{k}", float(out["teacher"][k]), now, 0) for k in ("top1", "top5")]
        )
