"""Slide-level probe: gated attention-MIL (ABMIL) over embedded bags, patient-grouped cross-validation.

A slide is a bag of tile features; ABMIL (Ilse, Tomczak & Welling 2018, "Attention-based deep multiple
instance learning", arXiv:1802.04712, the gated variant of their eq. 9) scores every tile,

    h_i = ReLU(W x_i),   a_i = softmax_i( w^T (tanh(V h_i) ⊙ sigm(U h_i)) ),   z = Σ_i a_i h_i,

and classifies the pooled ``z`` with one linear layer; the weights ``a`` (one per tile, summing to 1
over the bag) are returned for inspection. Bags are read from ``<dir>/<slide_id>.h5`` in the CLAM /
TRIDENT layout (datasets ``features`` (N, D) and, if present, ``coords`` (N, 2)) that
``ssl-path-embed`` writes, with labels from a ``slide_labels.csv`` (``slide_id, patient_id, label``).

Evaluation keeps a patient's slides on one side of every split (``StratifiedGroupKFold`` over patients,
stratified by slide label). Each fold reports balanced accuracy and AUROC (binary: score of the
second class; multi-class: macro one-vs-rest); the out-of-fold predictions of all folds are pooled and
given percentile-bootstrap 95 % intervals that resample whole patients
(:func:`ssl_path.eval.stats.bootstrap_ci`). Training is AdamW on a class-weighted cross-entropy for a
fixed number of epochs, or with early stopping on a patient-grouped inner validation split of the
training patients; seeded, so a run is reproducible on the CPU.
"""

from __future__ import annotations

import copy
import csv
import math
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn

from ssl_path.eval.stats import bootstrap_ci

LABEL_COLUMNS = ("slide_id", "patient_id", "label")
METRICS = ("balanced_accuracy", "auroc")
METRIC_NAMES = {"balanced_accuracy": "balanced accuracy", "auroc": "AUROC"}


class MILDataWarning(UserWarning):
    """Bags or labels left out of a MIL run (the message says which and how many)."""


# --- data ---------------------------------------------------------------------------------------------
@dataclass
class Bag:
    """One slide: its tile features (N, D) float32, coords (N, 2) or None, and integer label."""

    slide_id: str
    patient_id: str
    label: int
    features: np.ndarray
    coords: np.ndarray | None = None


def read_slide_labels(path: str | Path) -> list[dict[str, str]]:
    """Rows of ``slide_labels.csv`` (columns ``slide_id, patient_id, label``; others are ignored).

    Raises ``ValueError`` on a missing column, an empty field or a slide listed twice.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a spreadsheet's BOM
        reader = csv.DictReader(f)
        missing = [c for c in LABEL_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; need {list(LABEL_COLUMNS)}")
        rows = [{c: (r[c] or "").strip() for c in LABEL_COLUMNS} for r in reader]
    for i, r in enumerate(rows, start=2):
        empty = [c for c in LABEL_COLUMNS if not r[c]]
        if empty:
            raise ValueError(f"{path}:{i}: empty {empty}")
    dup = sorted(s for s, n in Counter(r["slide_id"] for r in rows).items() if n > 1)
    if dup:
        raise ValueError(f"{path}: slide_id listed more than once: {dup[:10]}")
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def class_names(labels: list[str]) -> list[str]:
    """Sorted distinct labels: numerically when all are integers (``"2" < "10"``), else as text."""
    distinct = set(labels)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


def read_bag(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``(features (N, D) float32, coords (N, 2) or None)`` of one CLAM/TRIDENT-style ``.h5`` file."""
    import h5py

    with h5py.File(path, "r") as f:
        if "features" not in f:
            raise ValueError(f"{path}: no 'features' dataset (has {sorted(f.keys())})")
        feats = np.asarray(f["features"][()], dtype=np.float32)
        coords = np.asarray(f["coords"][()]) if "coords" in f else None
    if feats.ndim == 3 and feats.shape[0] == 1:  # some writers keep a leading batch axis
        feats = feats[0]
    if feats.ndim != 2:
        raise ValueError(f"{path}: features must be (N, D), got shape {feats.shape}")
    if coords is not None and (coords.ndim != 2 or coords.shape[0] != feats.shape[0]):
        raise ValueError(f"{path}: coords shape {coords.shape} does not match features {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError(f"{path}: features contain NaN or inf")
    return feats, coords


def read_bags(
    features_dir: str | Path, labels_csv: str | Path, missing_bags: str = "error"
) -> tuple[list[Bag], list[str]]:
    """The labelled bags of ``features_dir`` (``<slide_id>.h5``) and the class names (label index order).

    A labelled slide without a bag (no file, or a file with zero tiles) raises ``FileNotFoundError``
    when ``missing_bags="error"``; with ``"skip"`` it is left out with one :class:`MILDataWarning`
    giving the count and the first ids. Bags without a label row are always left out with such a
    warning (a cohort is often embedded whole and labelled in part). Classes come from the labels of
    the slides actually used.
    """
    if missing_bags not in ("error", "skip"):
        raise ValueError(f"missing_bags must be 'error' or 'skip', got {missing_bags!r}")
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise FileNotFoundError(f"features directory {features_dir} does not exist")
    rows = read_slide_labels(labels_csv)
    files = {p.stem: p for p in sorted(features_dir.glob("*.h5"))}
    labelled = {r["slide_id"] for r in rows}
    unlabelled = sorted(set(files) - labelled)
    if unlabelled:
        warnings.warn(
            f"{len(unlabelled)} bag(s) in {features_dir} have no row in {labels_csv} and are not used: "
            f"{unlabelled[:10]}{' ...' if len(unlabelled) > 10 else ''}",
            MILDataWarning,
            stacklevel=2,
        )
    loaded, absent, empty = [], [], []
    for r in rows:
        if r["slide_id"] not in files:
            absent.append(r["slide_id"])
            continue
        feats, coords = read_bag(files[r["slide_id"]])
        if len(feats) == 0:
            empty.append(r["slide_id"])
            continue
        loaded.append((r, feats, coords))
    if absent or empty:
        msg = (
            f"{len(absent) + len(empty)} labelled slide(s) have no bag in {features_dir}: "
            f"{len(absent)} without <slide_id>.h5 {absent[:10]}, {len(empty)} with zero tiles {empty[:10]}"
        )
        if missing_bags == "error":
            raise FileNotFoundError(msg + " (missing_bags=skip leaves them out)")
        warnings.warn(msg + "; left out (missing_bags=skip)", MILDataWarning, stacklevel=2)
    if not loaded:
        raise ValueError(f"no labelled bags in {features_dir}")
    dims = Counter(f.shape[1] for _, f, _ in loaded)
    if len(dims) > 1:
        raise ValueError(f"bags have different feature sizes {dict(dims)}; embed all slides with one model")
    classes = class_names([r["label"] for r, _, _ in loaded])
    if len(classes) < 2:
        raise ValueError(f"need at least two classes, got {classes}")
    index = {c: i for i, c in enumerate(classes)}
    bags = [Bag(r["slide_id"], r["patient_id"], index[r["label"]], f, c) for r, f, c in loaded]
    return bags, classes


# --- model --------------------------------------------------------------------------------------------
class GatedABMIL(nn.Module):
    """Gated attention-MIL (Ilse et al. 2018): tile embedding, gated attention, attention pooling, linear.

    ``forward(x (B, N, D), mask (B, N) bool or None) -> (logits (B, C), attention (B, N))``; padded
    tiles (``mask`` False) get zero attention, so a padded batch gives each bag the output it gets
    alone. Inputs are standardised with the ``input_mean`` / ``input_std`` buffers (identity until
    :meth:`set_input_stats`), so the fitted model carries its own preprocessing.
    """

    def __init__(
        self, in_dim: int, n_classes: int, hidden: int = 128, attention_dim: int = 128, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_std", torch.ones(in_dim))
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden, attention_dim)  # tanh branch (V)
        self.attention_u = nn.Linear(hidden, attention_dim)  # sigmoid gate (U)
        self.attention_w = nn.Linear(attention_dim, 1)  # w
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, n_classes))

    @torch.no_grad()
    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.input_mean.copy_(mean)
        self.input_std.copy_(std.clamp_min(1e-6))

    def attention_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N, hidden) -> (B, N) unnormalised scores ``w^T (tanh(V h) ⊙ sigm(U h))``."""
        gated = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        return self.attention_w(gated).squeeze(-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed((x - self.input_mean) / self.input_std)  # (B, N, hidden)
        scores = self.attention_logits(h)  # (B, N)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=1)  # over the tiles of each bag
        pooled = torch.bmm(attention.unsqueeze(1), h).squeeze(1)  # (B, hidden) = Σ_i a_i h_i
        return self.classifier(pooled), attention


def pad_bags(bags: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags (N_b, D) -> zero-padded ``(B, max N, D)`` and the ``(B, max N)`` mask of real tiles."""
    n_max = max(len(b) for b in bags)
    x = bags[0].new_zeros(len(bags), n_max, bags[0].shape[1])
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool, device=bags[0].device)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    return x, mask


# --- training -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MILConfig:
    """ABMIL model and training settings (every default listed in ``configs/mil.yaml``).

    ``hidden``: tile embedding width; ``attention_dim``: width of the gated attention branches;
    ``dropout``: on the tile embedding and before the classifier; ``epochs``: training epochs (the
    maximum, with early stopping); ``lr``, ``weight_decay``: AdamW; ``batch_size``: bags per step
    (zero-padded and masked; 1 = Ilse et al.); ``max_tiles``: a random subset of at most this many
    tiles per bag and step while training (memory cap; ``None`` = all; prediction always uses all);
    ``val_fraction``: share of the training patients held out (grouped, stratified) for early
    stopping on the validation loss, the best epoch's weights kept; 0 trains exactly ``epochs``;
    ``patience``: epochs without improvement before stopping; ``class_weighted``: inverse class
    frequency weights in the loss (the metric is balanced accuracy); ``standardize``: z-score tile
    features with the training tiles' mean / std; ``device``: ``auto`` = CUDA when available.
    """

    hidden: int = 128
    attention_dim: int = 128
    dropout: float = 0.25
    epochs: int = 40
    lr: float = 2e-4
    weight_decay: float = 1e-4
    batch_size: int = 1
    max_tiles: int | None = None
    val_fraction: float = 0.0
    patience: int = 10
    class_weighted: bool = True
    standardize: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        if min(self.hidden, self.attention_dim, self.epochs, self.batch_size) < 1:
            raise ValueError("hidden, attention_dim, epochs and batch_size must be >= 1")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1 or null, got {self.max_tiles}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def _tensors(bags: list[Bag]) -> list[torch.Tensor]:
    """CPU views of the bags' features: a cohort may not fit on the device; batches are moved there."""
    return [torch.as_tensor(b.features, dtype=torch.float32) for b in bags]


def _input_stats(bags: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std over all tiles of the bags (float64 sums, one pass)."""
    n = sum(len(b) for b in bags)
    s = sum(b.double().sum(0) for b in bags)
    sq = sum(b.double().square().sum(0) for b in bags)
    mean = s / n
    var = (sq / n - mean.square()).clamp_min(0)
    return mean.float(), var.sqrt().float()


def _loss(model: GatedABMIL, x: list[torch.Tensor], y: torch.Tensor, weight: torch.Tensor | None) -> float:
    with torch.no_grad():
        device = y.device
        logits = torch.cat([model(b.to(device).unsqueeze(0))[0] for b in x])
        return float(nn.functional.cross_entropy(logits, y, weight=weight))


def inner_split(
    labels: np.ndarray, patients: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)``: about ``val_fraction`` of the patients held out, stratified by label."""
    n_splits = max(2, round(1 / val_fraction))
    if len(np.unique(patients)) < n_splits:
        raise ValueError(
            f"val_fraction={val_fraction} needs at least {n_splits} training patients, "
            f"got {len(np.unique(patients))}"
        )
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only ... members"
        return next(iter(cv.split(np.zeros(len(labels)), labels, patients)))


def train_abmil(bags: list[Bag], n_classes: int, cfg: MILConfig, seed: int = 0) -> tuple[GatedABMIL, int]:
    """Fit an ABMIL on ``bags``; returns the model (eval mode) and the epochs it trained
    (with early stopping: the best epoch, whose weights are kept)."""
    device = cfg.torch_device()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    labels = np.array([b.label for b in bags])
    train_idx, val_idx = np.arange(len(bags)), np.array([], dtype=int)
    if cfg.val_fraction > 0:
        train_idx, val_idx = inner_split(
            labels, np.array([b.patient_id for b in bags]), cfg.val_fraction, seed
        )
    x = _tensors(bags)
    x_train, x_val = [x[i] for i in train_idx], [x[i] for i in val_idx]
    y_train = torch.as_tensor(labels[train_idx], device=device)
    y_val = torch.as_tensor(labels[val_idx], device=device)

    model = GatedABMIL(x[0].shape[1], n_classes, cfg.hidden, cfg.attention_dim, cfg.dropout).to(device)
    if cfg.standardize:
        model.set_input_stats(*(s.to(device) for s in _input_stats(x_train)))
    weight = None
    if cfg.class_weighted:
        counts = torch.bincount(y_train, minlength=n_classes).float()
        # mean 1 over the training bags: n / (C n_c) for the classes present
        n_present = int((counts > 0).sum())
        weight = torch.where(counts > 0, len(y_train) / (n_present * counts.clamp_min(1)), 0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    best_loss, best_state, best_epoch, stale = math.inf, None, cfg.epochs, 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=gen).tolist()
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start : start + cfg.batch_size]
            tiles = [x_train[i] for i in batch]
            if cfg.max_tiles is not None:
                tiles = [
                    t[torch.randperm(len(t), generator=gen)[: cfg.max_tiles]] if len(t) > cfg.max_tiles else t
                    for t in tiles
                ]
            xb, mask = pad_bags(tiles)
            logits, _ = model(xb.to(device, non_blocking=True), mask.to(device, non_blocking=True))
            loss = nn.functional.cross_entropy(logits, y_train[batch], reduction="none")
            if weight is not None:  # per-bag weights, not normalised by the batch's (at batch size 1,
                loss = loss * weight[y_train[batch]]  # cross_entropy(weight=) would cancel them)
            loss = loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if len(x_val):
            model.eval()
            val_loss = _loss(model, x_val, y_val, weight)
            if val_loss < best_loss - 1e-6:
                best_loss, best_state, best_epoch, stale = (
                    val_loss,
                    copy.deepcopy(model.state_dict()),
                    epoch,
                    0,
                )
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), best_epoch


@torch.no_grad()
def predict(model: GatedABMIL, bags: list[Bag]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities (M, C) and each bag's attention (N_b,) (all tiles, in file order)."""
    device = next(model.parameters()).device
    model.eval()
    probs, attention = [], []
    for b in _tensors(bags):
        logits, a = model(b.to(device).unsqueeze(0))
        probs.append(torch.softmax(logits.float(), dim=1)[0].cpu().numpy())
        attention.append(a[0].float().cpu().numpy())
    return np.stack(probs), attention


# --- evaluation ---------------------------------------------------------------------------------------
def patient_folds(labels: np.ndarray, patients: np.ndarray, n_folds: int, seed: int) -> list[tuple]:
    """Outer ``(train, test)`` index pairs: ``StratifiedGroupKFold`` over patients, shuffled by ``seed``."""
    n_patients = len(np.unique(patients))
    if not 2 <= n_folds <= n_patients:
        raise ValueError(f"folds must be in [2, number of patients = {n_patients}], got {n_folds}")
    cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only ... members"
        return list(cv.split(np.zeros(len(labels)), labels, patients))


def balanced_accuracy(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Balanced accuracy of the arg-max class (``probs`` (M, C)): the mean recall over the classes
    present in ``y_true`` (scikit-learn's ``balanced_accuracy_score``, without its per-call overhead,
    which dominated a 1000-resample bootstrap)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(probs).argmax(1)
    recalls = [np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]
    return float(np.mean(recalls))


def _binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count one half), equal to ``sklearn.metrics.roc_auc_score``."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUROC of the second class's probability, or the macro mean of the one-vs-rest AUROCs
    for C > 2 (scikit-learn's ``roc_auc_score(..., multi_class="ovr", average="macro")``).

    Raises ``ValueError`` when undefined (a class absent from ``y_true``).
    """
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    n_classes = probs.shape[1]
    absent = sorted(set(range(n_classes)) - set(np.unique(y_true).tolist()))
    if absent:
        raise ValueError(f"AUROC undefined: classes {absent} absent")
    if n_classes == 2:
        return _binary_auroc(y_true == 1, probs[:, 1])
    return float(np.mean([_binary_auroc(y_true == c, probs[:, c]) for c in range(n_classes)]))


_METRIC_FNS = {"balanced_accuracy": balanced_accuracy, "auroc": auroc}


def slide_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """:data:`METRICS` of one set of predictions; an undefined AUROC is NaN."""
    out = {}
    for name, fn in _METRIC_FNS.items():
        try:
            out[name] = fn(y_true, probs)
        except ValueError:
            out[name] = float("nan")
    return out


@dataclass
class MILResult:
    """Everything a cross-validated ABMIL run produced.

    ``folds``: one row per (seed, fold): sizes, epochs trained and :data:`METRICS`; ``pooled``: one row
    per seed: every metric on the pooled out-of-fold predictions with its bootstrap interval
    (``<metric>``, ``<metric>_low``, ``<metric>_high``); ``predictions``: one row per (seed, slide);
    ``attention``: ``{seed: {slide_id: (N,) weights of its out-of-fold model}}``.
    """

    classes: list[str]
    folds: list[dict] = field(default_factory=list)
    pooled: list[dict] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    attention: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)


def cross_validate(
    bags: list[Bag],
    classes: list[str],
    cfg: MILConfig,
    folds: int = 5,
    seeds: tuple[int, ...] | list[int] = (0,),
    n_boot: int = 1000,
    alpha: float = 0.05,
) -> MILResult:
    """Patient-grouped ``folds``-fold cross-validation of ABMIL, repeated for each seed (fold shuffle and
    initialisation). Per-fold metrics, pooled out-of-fold metrics with patient-bootstrap CIs, and the
    attention of every slide under the model that did not see it."""
    labels = np.array([b.label for b in bags])
    patients = np.array([b.patient_id for b in bags])
    mixed = [p for p in np.unique(patients) if len(np.unique(labels[patients == p])) > 1]
    if len(np.unique(labels)) < 2:
        raise ValueError("need bags of at least two classes")
    result = MILResult(
        classes=list(classes),
        config={**asdict(cfg), "folds": folds, "seeds": list(seeds), "n_boot": n_boot, "alpha": alpha},
    )
    result.config["patients_with_mixed_labels"] = len(mixed)
    for seed in seeds:
        oof = np.full((len(bags), len(classes)), np.nan)
        result.attention[seed] = {}
        for k, (tr, te) in enumerate(patient_folds(labels, patients, folds, seed)):
            model, epochs = train_abmil([bags[i] for i in tr], len(classes), cfg, seed=seed * 1000 + k)
            probs, attention = predict(model, [bags[i] for i in te])
            oof[te] = probs
            for i, a in zip(te, attention, strict=True):
                result.attention[seed][bags[i].slide_id] = a
            result.folds.append(
                {
                    "seed": seed,
                    "fold": k,
                    "n_train": len(tr),
                    "n_test": len(te),
                    "n_test_patients": len(np.unique(patients[te])),
                    "epochs": epochs,
                    **slide_metrics(labels[te], probs),
                }
            )
        row: dict = {"seed": seed, "n": len(bags), "n_patients": len(np.unique(patients))}
        for name, fn in _METRIC_FNS.items():
            try:
                point, low, high = bootstrap_ci(labels, oof, fn, n_boot, alpha, seed=seed, groups=patients)
            except ValueError:  # undefined on the whole pooled set
                point, low, high = (float("nan"),) * 3
            row |= {name: point, f"{name}_low": low, f"{name}_high": high}
        result.pooled.append(row)
        for i, b in enumerate(bags):
            pred = {
                "seed": seed,
                "slide_id": b.slide_id,
                "patient_id": b.patient_id,
                "label": classes[b.label],
                "pred": classes[int(oof[i].argmax())],
            }
            result.predictions.append(
                pred | {f"prob_{c}": float(p) for c, p in zip(classes, oof[i], strict=True)}
            )
    return result


# --- outputs ------------------------------------------------------------------------------------------
def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _fmt(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:.3f}"


def summary_markdown(result: MILResult, bags: list[Bag], header: str = "") -> str:
    """The summary: data, split, per-fold mean ± std and pooled out-of-fold figures with CIs."""
    counts = Counter(result.classes[b.label] for b in bags)
    sizes = np.array([len(b.features) for b in bags])
    cfg = result.config
    lines = [
        "# ABMIL slide-level probe",
        "",
        *([header, ""] if header else []),
        f"{len(bags)} slides, {len(np.unique([b.patient_id for b in bags]))} patients, "
        f"{bags[0].features.shape[1]}-d features, tiles per slide {int(np.median(sizes))} median "
        f"[{sizes.min()}, {sizes.max()}]; classes: "
        + ", ".join(f"{c} ({counts[c]})" for c in result.classes),
        f"split: patient-grouped stratified {cfg['folds']}-fold (StratifiedGroupKFold), "
        f"seeds {cfg['seeds']}; "
        f"CIs: {100 * (1 - cfg['alpha']):g} % percentile bootstrap over patients ({cfg['n_boot']} resamples)",
        "",
        "| metric | per fold: mean ± std (n) | pooled out-of-fold [CI] |",
        "| --- | --- | --- |",
    ]
    for m in METRICS:
        vals = np.array([r[m] for r in result.folds], dtype=float)
        vals = vals[np.isfinite(vals)]
        std = vals.std(ddof=1) if len(vals) > 1 else 0.0
        per_fold = f"{vals.mean():.3f} ± {std:.3f} ({len(vals)})" if len(vals) else "n/a"
        pooled = "; ".join(
            f"{_fmt(r[m])} [{_fmt(r[f'{m}_low'])}, {_fmt(r[f'{m}_high'])}]"
            + (f" (seed {r['seed']})" if len(result.pooled) > 1 else "")
            for r in result.pooled
        )
        lines.append(f"| {METRIC_NAMES[m]} | {per_fold} | {pooled} |")
    if cfg.get("patients_with_mixed_labels"):
        lines += ["", f"{cfg['patients_with_mixed_labels']} patient(s) have slides of more than one label."]
    lines += [
        "",
        "Per fold: results.csv; per slide: predictions.csv; attention/seed-<seed>/<slide_id>.npy holds the "
        "out-of-fold model's attention over the slide's tiles, in the order of its .h5 `coords`.",
    ]
    return "\n".join(lines) + "\n"


def write_outputs(result: MILResult, bags: list[Bag], output: str | Path, header: str = "") -> Path:
    """``results.csv`` (per fold), ``pooled.csv``, ``predictions.csv``, ``summary.md`` and
    ``attention/seed-<seed>/<slide_id>.npy`` under ``output``; returns the summary's path."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    _write_csv(output / "results.csv", result.folds)
    _write_csv(output / "pooled.csv", result.pooled)
    _write_csv(output / "predictions.csv", result.predictions)
    for seed, per_slide in result.attention.items():
        d = output / "attention" / f"seed-{seed}"
        d.mkdir(parents=True, exist_ok=True)
        for slide_id, a in per_slide.items():
            np.save(d / f"{slide_id}.npy", a.astype(np.float32))
    summary = output / "summary.md"
    summary.write_text(summary_markdown(result, bags, header))
    return summary
