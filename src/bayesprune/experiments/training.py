"""BMRS training protocols with durable run directories (docs/maths.md section 4).

* :func:`run_continuous`: prune after every epoch, once more at the end, fine-tune
  ``finetune_epochs`` without pruning, report the test accuracy of the best-validation
  checkpoint of the fine-tuning phase.
* :func:`run_sweep`: post-training pruning; train without pruning decisions, then for each
  criterion sweep the parameter compression from 0 to 100 % with a short fine-tune at each point;
  BMRS criteria also report their stop point (where no ``dF >= 0`` is left).

A run directory holds ``config.json`` (the resolved configuration), ``metrics.jsonl`` (one JSON
line per epoch), ``checkpoint.pt`` (model, optimiser and RNG state after the last finished
epoch; ``checkpoint.prev.pt`` the one before, kept until the next is safely written),
``run.lock`` (held while a process runs it) and, at the end, ``summary.json``.  Every file is
written atomically (rundir.py); a finished run is only read.  Re-running the same command resumes
from the checkpoint and ends with exactly the numbers of an uninterrupted run; a run that fails
before its first checkpoint leaves nothing that blocks a corrected command.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import io
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import pruning as crit
from ..criteria import Criterion, finite, get_criterion
from .data import load_dataset, make_loader
from .models import build_model, noise_layer_names
from ..noise import DEFAULT_KL_WEIGHTING, DEFAULT_SHARING, add_noise, kl, noise_layers
from ..reduction import REFERENCE_THRESHOLD
from ..removal import count_parameters
from . import distributed
from . import rundir as files

__all__ = ["RunConfig", "PAPER_DEFAULTS", "run_continuous", "run_sweep", "run_dir_name", "TrainingDiverged", "CheckpointError",
           "resolve_config", "METHODS", "MAX_CROSS_ENTROPY"]

#: methods of a continuous run: "none" trains the same noisy network (noise + KL) without pruning;
#: "dense" trains the network without noise layers at all (plain cross-entropy), the reference
#: point for what the noise and the KL cost in accuracy
METHODS = ("none", "bmrs_n", "bmrs_u", "snr", "etheta", "l2", "grad", "dense")

#: (model, dataset) -> hyperparameters of the BMRS paper (docs/maths.md section 4); epochs 50 + 10
PAPER_DEFAULTS: dict[tuple[str, str], dict] = {
    ("mlp", "mnist"): dict(extra_layers=7, width=100, batch_size=128, lr=8.5e-4),
    ("mlp", "fashion-mnist"): dict(extra_layers=1, width=150, batch_size=128, lr=1.5e-3),
    ("mlp", "cifar10"): dict(extra_layers=5, width=150, batch_size=32, lr=6.8e-4),
    ("lenet5", "mnist"): dict(batch_size=128, lr=1.4e-3),
    ("lenet5", "fashion-mnist"): dict(batch_size=32, lr=1.4e-3),
    ("lenet5", "cifar10"): dict(batch_size=64, lr=1.0e-3),
}
#: Structured Bayesian Pruning's LeNet5-Caffe is not in the BMRS paper: LeNet5/MNIST's batch and lr,
#: on the native 28x28 images as SBP (its 431 k parameters)
PAPER_DEFAULTS.update({("lenet5-caffe", d): dict(batch_size=128, lr=1.4e-3, image_size=28) for d in ("mnist", "fashion-mnist")})
#: the BMRS paper's Table 2 hyperparameters (pretrained ResNet-50 and ViT-B/16 on CIFAR-10 and
#: TinyImageNet; docs/maths.md section 4.4); ``reproduce bmrs-table2`` applies them to any model
PAPER_TABLE2: dict = dict(epochs=100, batch_size=32, lr=6.8e-4)
PAPER_DEFAULTS.update({(m, d): dict(PAPER_TABLE2) for m in ("resnet50", "vit-b16") for d in ("cifar10", "tinyimagenet")})


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf (or absurd), or the optimiser's step overflowed; the message says
    which checkpoint the run directory holds."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or that is not a checkpoint of this run."""


#: the training epoch run_continuous calls in this context (None: _train_epoch); ensemble.py sets
#: it in each member's thread to batch the members' epochs
EPOCH_RUNNER: contextvars.ContextVar = contextvars.ContextVar("EPOCH_RUNNER", default=None)

#: mean cross-entropy (nats per example) above which training counts as diverged: a uniform guess
#: gives log(classes), about 2.3 for 10 classes; 1e4 means logits of order 1e4, weights blown up
MAX_CROSS_ENTROPY = 1e4


@dataclass
class RunConfig:
    dataset: str = "digits"
    model: str = "lenet5"
    method: str = "bmrs_n"
    data_dir: str | None = None
    out_dir: str = "runs/default"
    epochs: int = 50
    finetune_epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    noise_lr: float | None = None  # learning rate of mu/log_sigma; None: the same as lr (the paper)
    seed: int = 0
    width: int | None = None
    extra_layers: int | None = None
    kl_weighting: str = DEFAULT_KL_WEIGHTING
    kl_scale: float = 1.0  # beta: the KL term of the loss is beta x kl(model, kl_weighting) (docs/maths.md section 1)
    sharing: str = DEFAULT_SHARING
    precision: float = 8.0
    # the rule of bmrs_n/bmrs_u: threshold in dF, or prior odds of removal (threshold = -log odds);
    # neither: the criterion's default (resolve_config writes bmrs_n's out as a threshold)
    threshold: float | None = None
    prior_odds: float | None = None
    compression: float | None = None
    monotone: bool = True
    round_to: int | None = None  # each layer (coupled group) keeps a multiple of it (pruning.round_masks)
    shrink: bool = False
    device: str = "auto"
    val_fraction: float = 0.2
    # sweep only
    sweep_criteria: list = field(default_factory=lambda: ["l2", "snr", "etheta", "bmrs_n", "bmrs_u"])
    sweep_points: list = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
    sweep_finetune_epochs: int = 1
    # after the continuous run: shrink, then this many epochs of cross-entropy on the plain small
    # network (0: off; finetune.py); lr None: the run's lr
    dense_finetune_epochs: int = 0
    dense_finetune_lr: float | None = None
    dense_finetune_schedule: str = "cosine"
    # processes that train this one run (torchrun / DDP); set by run_continuous from the process group
    world_size: int = 1
    # pretrained weights: a state-dict file (models.load_weights); data: resize to image_size, keep
    # train_subset / test_subset images of the official training / test set (data.load_dataset)
    weights: str | None = None
    image_size: int | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    # the summary's size_speed: CPU latency at batch 1 and 128 (False: parameters and MACs only)
    measure_latency: bool = True

    def validate(self) -> None:
        from .data import DATASETS
        from .models import MODELS, TORCHVISION_PREFIX

        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; valid: {', '.join(DATASETS)}")
        if self.model not in MODELS and not self.model.startswith(TORCHVISION_PREFIX):
            raise ValueError(f"unknown model {self.model!r}; valid: {', '.join(MODELS)} or tv:<torchvision name>")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.finetune_epochs < 0:
            raise ValueError(f"finetune_epochs must be >= 0, got {self.finetune_epochs}")
        if not (isinstance(self.kl_scale, (int, float)) and self.kl_scale > 0 and math.isfinite(self.kl_scale)):
            raise ValueError(f"kl_scale must be a positive number, got {self.kl_scale!r}")
        if self.kl_scale != 1 and self.method == "dense":
            raise ValueError("method 'dense' has no noise layers and no KL term: kl_scale does not apply")
        for name in ("lr", "noise_lr"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive number, got {v}")
        for name in ("threshold", "prior_odds", "compression", "precision"):
            if getattr(self, name) is not None:
                finite(name, getattr(self, name))
        if self.threshold is not None and self.prior_odds is not None:
            raise ValueError("give threshold or prior_odds, not both (threshold = -log(prior_odds))")
        if self.prior_odds is not None and (self.method not in ("bmrs_n", "bmrs_u") or not self.prior_odds > 0):
            raise ValueError(f"prior_odds (> 0) applies to methods bmrs_n and bmrs_u; got {self.prior_odds} for {self.method!r}")
        if self.compression is not None and (self.threshold is not None or self.prior_odds is not None):
            raise ValueError("give compression or a threshold/prior_odds, not both")
        if self.method in ("l2", "grad") and self.compression is None and self.threshold is None:
            raise ValueError(f"method {self.method!r} needs --compression (the paper uses BMRS_N's) or --threshold")
        if self.compression is not None and not 0 <= self.compression <= 1:
            raise ValueError(f"compression must be in [0, 1], got {self.compression}")
        if not self.precision > 0:
            raise ValueError(f"precision must be > 0, got {self.precision}")
        if self.round_to is not None:
            if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
                raise ValueError(f"round_to must be a positive integer, got {self.round_to!r}")
            if self.method in ("none", "dense"):
                raise ValueError(f"method {self.method!r} prunes nothing: round_to does not apply")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}: the best-validation checkpoint "
                             "of the fine-tuning phase needs a validation set, and a training set must remain")
        if not isinstance(self.dense_finetune_epochs, int) or self.dense_finetune_epochs < 0:
            raise ValueError(f"dense_finetune_epochs must be an integer >= 0 (0: off), got {self.dense_finetune_epochs!r}")
        v = self.dense_finetune_lr
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise ValueError(f"dense_finetune_lr must be a positive number, got {v}")
        from .finetune import SCHEDULES

        if self.dense_finetune_schedule not in SCHEDULES:
            raise ValueError(f"unknown dense_finetune_schedule {self.dense_finetune_schedule!r}; valid: {', '.join(SCHEDULES)}")
        if v is not None and not self.dense_finetune_epochs:
            raise ValueError("dense_finetune_lr needs dense_finetune_epochs >= 1")
        if self.method == "dense" and self.dense_finetune_epochs:
            raise ValueError("method 'dense' has no noise layers and prunes nothing: --dense-finetune-epochs does not apply")
        if not (isinstance(self.world_size, int) and self.world_size >= 1):
            raise ValueError(f"world_size must be an integer >= 1, got {self.world_size!r}")
        for name in ("image_size", "train_subset", "test_subset"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.weights is not None:
            from .models import WEIGHTS_MODELS

            if self.model not in WEIGHTS_MODELS:
                raise ValueError(f"weights (a state-dict file) apply to the models {', '.join(WEIGHTS_MODELS)}, not {self.model!r}")
        if self.method == "dense" and self.shrink:
            raise ValueError("method 'dense' has no noise layers and prunes nothing: --shrink does not apply")


def resolve_config(**overrides) -> RunConfig:
    """A RunConfig with the paper's defaults for (model, dataset), then ``overrides`` (not None)."""
    dataset = overrides.get("dataset") or RunConfig.dataset
    model = overrides.get("model") or ("mlp" if dataset == "digits" else RunConfig.model)
    base = dict(PAPER_DEFAULTS.get((model, dataset), {}), model=model)
    if dataset == "digits":
        # the embedded offline default: 1,150 training images give 72 steps an epoch, so the noise
        # parameters get a larger learning rate to move as far as in the paper's MNIST runs
        base.update(epochs=10, finetune_epochs=2, batch_size=16, lr=3e-3, noise_lr=5e-2)
        if model == "mlp":
            base.update(width=100, extra_layers=1)
    known = {f.name for f in fields(RunConfig)}
    for k, v in overrides.items():
        if k not in known:
            raise ValueError(f"unknown option {k!r}")
        if v is not None:
            base[k] = v
    if base.get("method", RunConfig.method) == "bmrs_n" and all(base.get(k) is None for k in ("threshold", "prior_odds", "compression")):
        # the default rule, written out so that config.json and the run directory name state it
        base["threshold"] = get_criterion("bmrs_n").threshold
    cfg = RunConfig(**base)
    cfg.validate()
    return cfg


def criterion_of(cfg: RunConfig) -> Criterion | None:
    """The criterion object of a run's method and options (None for "none" and "dense")."""
    if cfg.method in ("none", "dense"):
        return None
    options = {k: getattr(cfg, k) for k in ("threshold", "prior_odds") if getattr(cfg, k) is not None}
    if cfg.method == "bmrs_u":
        options["precision"] = cfg.precision
    return get_criterion(cfg.method, **options)


# ---------------------------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; valid: auto, cpu, cuda")
    return torch.device(name)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _build(cfg: RunConfig, splits, device):
    kwargs = {}
    if cfg.model == "mlp":
        if cfg.width is not None:
            kwargs["width"] = cfg.width
        if cfg.extra_layers is not None:
            kwargs["extra_layers"] = cfg.extra_layers
    if cfg.weights is not None:
        kwargs["weights"] = cfg.weights
    model = build_model(cfg.model, splits.in_channels, splits.image_size, splits.num_classes, **kwargs).to(device)
    example = splits.example_inputs(2).to(device)
    if cfg.method != "dense":
        add_noise(model, example, sharing=cfg.sharing, layers=noise_layer_names(cfg.model, model))
    return model, example


def load_splits(cfg: RunConfig):
    """The data of a run: ``load_dataset`` with the run's split, seed, image size and subsets."""
    return load_dataset(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed, image_size=cfg.image_size,
                        train_subset=cfg.train_subset, test_subset=cfg.test_subset)


def evaluate(model: nn.Module, dataset, device, batch_size: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode."""
    was = model.training
    model.eval()
    loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in make_loader(dataset, batch_size, shuffle=False, seed=0):
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            n += len(y)
    model.train(was)
    return loss / max(n, 1), correct / max(n, 1)


def _optimizer(model, cfg: RunConfig) -> torch.optim.Optimizer:
    """Adam without weight decay; noise parameters optionally get their own learning rate."""
    noise_params = [p for n, p in model.named_parameters() if "bayes_noise" in n]
    ids = {id(p) for p in noise_params}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.Adam(
        [{"params": rest}, {"params": noise_params, "lr": cfg.noise_lr or cfg.lr}], lr=cfg.lr
    )


def _train_epoch(model, opt, loader, cfg: RunConfig, num_train: int, device, desc: str):
    model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, CE, KL; read once an epoch
    steps = 0
    noisy = bool(noise_layers(model))
    bar = tqdm(loader, desc=desc, leave=False, disable=None)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        ce = F.cross_entropy(model(x), y)
        k = kl(model, cfg.kl_weighting, num_train) if noisy else torch.zeros((), device=ce.device)
        if cfg.kl_scale != 1:
            k = k * cfg.kl_scale
        loss = ce + k
        if not (torch.isfinite(loss) & (ce <= MAX_CROSS_ENTROPY)):  # the one host-device sync of a step
            for n in noise_layers(model):
                n.check_finite()  # names the layer whose parameters went non-finite
            what = "became" if not math.isfinite(loss.item()) else f"exceeds {MAX_CROSS_ENTROPY:g} nats (absurd):"
            raise TrainingDiverged(f"loss {what} {loss.item():.4g} (cross-entropy {ce.item():.4g}, KL {k.item():.4g}) "
                                   f"in {desc}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        try:
            opt.step()
        except RuntimeError as e:  # Adam's step size lr / (1 - beta1^t) beyond float32
            if "overflow" not in str(e):
                raise
            raise TrainingDiverged(f"the optimiser's step overflowed in {desc} ({e}): --lr {cfg.lr:g} is far too large") from None
        sums += torch.stack([loss.detach(), ce.detach(), k.detach()]).to(sums.dtype)
        steps += 1
    tot, ce_sum, kl_sum = sums.tolist()
    return tot / steps, ce_sum / steps, kl_sum / steps


def _report(model, cfg: RunConfig, example) -> crit.PruneReport:
    """The masks' report; for a network without noise layers ("dense"), all parameters kept."""
    if cfg.method == "dense":
        n = count_parameters(model)
        return crit.PruneReport("dense", params_total=n, params_kept=n)
    return crit.report(model, criterion=cfg.method, example_inputs=example)


def _prune(model, cfg: RunConfig, example):
    criterion = criterion_of(cfg)
    if criterion is None:
        return _report(model, cfg, example)
    return crit.prune(model, criterion, compression=cfg.compression, monotone=cfg.monotone, round_to=cfg.round_to,
                      example_inputs=example)


# ---------------------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return name.replace(":", "_").replace("/", "_")


def run_dir_name(model: str, dataset: str, method: str, precision: float | None = None,
                 threshold: float | None = None, prior_odds: float | None = None,
                 kl_weighting: str | None = None, kl_scale: float | None = None) -> str:
    """``<model>-<dataset>-<method>[-p<precision> for bmrs_u][-t<threshold> when one is set]
    [-odds<prior odds> when they are set and not 1][-kl<weighting> when not the default][-klx<scale>
    when not 1]`` (":" and
    "/" of ``tv:`` names become "_"); ``bayesprune run`` and ``reproduce`` both use it.  Odds 1,
    the exact rule, and the default KL weighting are the plain name; ``dense`` has no KL."""
    name = f"{_safe(model)}-{dataset}-{method}"
    if method == "bmrs_u":
        name += f"-p{float(precision if precision is not None else 8.0):g}"
    if threshold is not None:
        name += f"-t{float(threshold):.3f}"
    if prior_odds is not None and float(prior_odds) != 1.0:
        name += f"-odds{float(prior_odds):.4g}"
    if kl_weighting not in (None, DEFAULT_KL_WEIGHTING) and method != "dense":
        name += f"-kl{kl_weighting}"
    if kl_scale not in (None, 1, 1.0) and method != "dense":
        name += f"-klx{float(kl_scale):g}"
    return name


#: RunConfig fields that do not change the experiment: where the data and outputs live, which device runs it
FREE_FIELDS = ("out_dir", "data_dir", "device")
#: what a checkpoint of run_continuous holds
CHECKPOINT_KEYS = ("model", "optimizer", "rng", "epoch", "metric_rows")


def config_difference(old: dict, new: dict) -> dict:
    """{field: (old, new)} of the fields in which two configs differ, ``FREE_FIELDS`` left out;
    fields ``old`` lacks were added to RunConfig later and cannot differ."""
    return {k: (old[k], v) for k, v in new.items() if k in old and old[k] != v and k not in FREE_FIELDS}


class RunDir:
    """config.json, metrics.jsonl, checkpoint.pt (+ checkpoint.prev.pt), summary.json and run.lock
    of one run; every write is atomic (rundir.py)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.loaded_from: Path | None = None

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def previous(self) -> Path:
        return self.path / "checkpoint.prev.pt"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    def has_training(self) -> bool:
        """A checkpoint or a summary exists: the directory holds (part of) a run."""
        return any(p.exists() for p in (self.checkpoint, self.previous, self.summary))

    def check_config(self, cfg: "RunConfig") -> None:
        """Raise if the directory holds training of another configuration (a config.json without
        a checkpoint or summary holds no training and is replaced)."""
        if not self.has_training():
            return
        if self.config_path.exists():
            where, old = self.config_path, files.read_json(self.config_path)
        elif self.summary.exists():
            where, old = self.summary, files.read_json(self.summary).get("config", {})
        else:
            return
        diff = config_difference(old, asdict(cfg))
        if diff:
            raise ValueError(f"{where} holds a run with another configuration ({diff}); "
                             "use another --out-dir or delete the directory")

    def finished(self, cfg: "RunConfig") -> dict | None:
        """The summary of a finished run of ``cfg`` (read only), or None if it has not finished."""
        if not self.summary.exists():
            return None
        self.check_config(cfg)
        return files.read_json(self.summary)

    def locked(self):
        """Create the directory and hold its lock for the block (rundir.held_run_dir)."""
        return files.held_run_dir(self.path)

    def write_config(self, cfg: "RunConfig") -> None:
        """config.json of ``cfg`` (refused if the directory holds training of another config)."""
        self.check_config(cfg)
        files.write_json(self.config_path, files.recorded(asdict(cfg)))

    def append_metrics(self, row: dict) -> None:
        files.append_line(self.metrics, json.dumps(row))

    def truncate_metrics(self, n_rows: int) -> None:
        """Drop metric lines written after the checkpoint (an interrupted epoch)."""
        files.keep_lines(self.metrics, n_rows)

    def save(self, state: dict) -> None:
        """checkpoint.pt := ``state``; the checkpoint it replaces becomes checkpoint.prev.pt only
        once the new one is written in full."""
        data = checkpoint_bytes(state)
        if self.checkpoint.exists():
            os.replace(self.checkpoint, self.previous)
        files.write_bytes(self.checkpoint, data)

    def load(self) -> dict | None:
        """The latest readable checkpoint (checkpoint.pt, else checkpoint.prev.pt with a message
        on stderr), or None if there is none; ``CheckpointError`` if none can be read."""
        errors = []
        for i, path in enumerate((self.checkpoint, self.previous)):
            if not path.exists():
                continue
            try:
                state = load_checkpoint(path, keys=CHECKPOINT_KEYS)
            except CheckpointError as e:
                errors.append(str(e))
                continue
            if errors:
                print(f"warning: {errors[0]}; resuming from {path} (epoch {state['epoch']}) instead", file=sys.stderr)
                bad = self.checkpoint.with_name(self.checkpoint.name + ".damaged")
                os.replace(self.checkpoint, bad)  # kept for a look; the next save starts a fresh pair
            self.loaded_from = path
            return state
        if errors:
            raise CheckpointError(f"{'; '.join(errors)}; no readable checkpoint is left: delete {self.path} to start over")
        return None

    def describe_checkpoints(self) -> str:
        """What checkpoint the directory holds, in words, for error messages."""
        held = []
        for path in (self.checkpoint, self.previous):
            if path.exists():
                try:
                    held.append(f"{path} (after epoch {int(load_checkpoint(path, keys=CHECKPOINT_KEYS)['epoch'])})")
                except CheckpointError:
                    held.append(f"{path} (unreadable)")
        if not held:
            return (f"no checkpoint was written (the run failed before its first finished epoch), so nothing in "
                    f"{self.path} blocks a corrected command")
        return (f"{self.path} holds {' and '.join(held)}; the same command resumes from there, while a changed "
                "--lr is another configuration: use another --out-dir or delete the directory")


def checkpoint_bytes(state: dict) -> bytes:
    """``torch.save(state)`` as bytes (written by rundir.write_bytes, so a full disk is an ``OSError``)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """``torch.save`` written atomically (rundir.write_bytes): an interruption never leaves half a file."""
    files.write_bytes(path, checkpoint_bytes(state))


def load_checkpoint(path: str | os.PathLike, *, keys: tuple[str, ...] = ()) -> dict:
    """``torch.load(weights_only=True)`` onto the CPU; a file that cannot be read, is not a dict
    or lacks one of ``keys`` is a ``CheckpointError`` naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it to start over") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this kind of run (it lacks {', '.join(missing)}); "
                              "delete it to start over")
    return state


def _rng_state() -> dict:
    """Only torch's generators draw during training (noise, shuffling uses seeded loaders)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _shrink_for_training(model, example):
    from ..removal import shrink_for_training

    return shrink_for_training(model, example)


def _structure_state(model) -> dict:
    return {n.layer_name: n.num_structures for n in noise_layers(model)}


def run_continuous(cfg: RunConfig, progress: bool = True) -> dict:
    """Continuous pruning (the BMRS paper's Table 1 protocol).  Returns the summary dict.

    A finished run is only read (its summary returned); otherwise the run directory is locked
    (``rundir.RunLockedError`` if another process runs it) and the run starts or resumes.
    With ``dense_finetune_epochs > 0`` the dense fine-tune follows (finetune.py) and its summary
    is returned."""
    cfg.validate()
    if cfg.dense_finetune_epochs:
        from .finetune import run_dense_finetune

        return run_dense_finetune(cfg, progress=progress)
    ctx = distributed.context()  # None in a single process
    if ctx is not None:  # one run on world_size processes: rank 0 decides, locks and writes
        cfg = ctx.record(cfg)
        rd = RunDir(cfg.out_dir)
        done = ctx.broadcast(rd.finished(cfg) if ctx.is_writer else None)
        if done is not None:
            return done
        with rd.locked() if ctx.is_writer else contextlib.nullcontext():
            return _run_continuous(cfg, rd, progress and ctx.is_writer, ctx)
    rd = RunDir(cfg.out_dir)
    done = rd.finished(cfg)  # raises if the directory holds a run with another configuration
    if done is not None:
        return done
    with rd.locked():
        done = rd.finished(cfg)  # finished by another process a moment ago
        if done is not None:
            return done
        return _run_continuous(cfg, rd, progress)


def _run_continuous(cfg: RunConfig, rd: RunDir, progress: bool, ctx: "distributed.Context | None" = None) -> dict:
    writer = ctx is None or ctx.is_writer
    if writer:
        rd.check_config(cfg)
    device = _device(cfg.device) if ctx is None else ctx.device(_device(cfg.device))
    t_start = time.time()
    splits = load_splits(cfg)
    _seed_all(cfg.seed)
    model, example = _build(cfg, splits, device)
    if ctx is not None:
        ctx.seed_noise(cfg.seed)
    params_dense = count_parameters(model)
    opt = _optimizer(model, cfg)
    total_epochs = cfg.epochs + cfg.finetune_epochs
    start_epoch, best, rows, kept_index = 0, None, 0, None
    state = rd.load() if ctx is None else ctx.broadcast(rd.load() if writer else None)
    if state is not None:
        try:
            if state.get("kept_index") is not None:
                model = _rebuild_shrunk(model, example, state["kept_index"])
                opt = _optimizer(model, cfg)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            _set_rng_state(state["rng"] if ctx is None else state["rng_ranks"][ctx.rank])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{rd.loaded_from} does not fit this run's model ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0]}); delete {rd.path} to start over") from None
        start_epoch, rows = int(state["epoch"]), int(state["metric_rows"])
        best = state.get("best")
        kept_index = state.get("kept_index")
        t_start -= float(state.get("elapsed", 0.0))
        if writer:
            rd.truncate_metrics(rows)
    else:
        if writer:
            rd.truncate_metrics(0)
        kept_index = {n.layer_name: list(range(n.num_structures)) for n in noise_layers(model)} if cfg.shrink else None
    epochs_bar = tqdm(range(start_epoch, total_epochs), desc=f"{cfg.method} {cfg.model}/{cfg.dataset} seed {cfg.seed}", disable=not progress, initial=start_epoch, total=total_epochs)
    rep = None
    train_model = model if ctx is None else ctx.wrap(model, device)  # DDP: gradients all-reduced
    for epoch in epochs_bar:
        phase = "prune" if epoch < cfg.epochs else "finetune"
        if ctx is None:
            loader = make_loader(splits.train, cfg.batch_size, shuffle=True, seed=cfg.seed * 100003 + epoch)
        else:
            loader = ctx.train_loader(splits.train, cfg.batch_size, cfg.seed * 100003, epoch)
        t0 = time.perf_counter()
        try:
            loss, ce, k = (EPOCH_RUNNER.get() or _train_epoch)(train_model, opt, loader, cfg, splits.num_train, device, f"epoch {epoch + 1}")
        except TrainingDiverged as e:
            raise TrainingDiverged(f"{e}; {rd.describe_checkpoints()}") from None
        train_time = time.perf_counter() - t0
        if phase == "prune" or epoch == cfg.epochs - 1:
            rep = _prune(model, cfg, example)
        else:
            rep = _report(model, cfg, example)
        if ctx is not None and cfg.method != "dense" and not ctx.sync_masks(model):
            rep = _report(model, cfg, example)  # rank 0's decisions, now every rank's
        if cfg.shrink and phase == "prune" and rep.structures_kept < sum(n.num_structures for n in noise_layers(model)):
            model, opt, kept_index = _shrink_step(model, opt, example, cfg, kept_index)
            train_model = model if ctx is None else ctx.wrap(model, device)
        val_loss, val_acc = evaluate(model, splits.val, device)
        row = dict(
            epoch=epoch + 1,
            phase=phase,
            train_loss=loss,
            train_ce=ce,
            kl=k,
            val_loss=val_loss,
            val_acc=val_acc,
            structure_compression=rep.structure_compression,
            param_compression=1 - rep.params_kept / params_dense,
            params=count_parameters(model),
            epoch_time=train_time,
            kept={r.layer: r.kept for r in rep.layers},
        )
        rng_ranks = None if ctx is None else ctx.gather(_rng_state())
        if epoch == start_epoch and writer:
            rd.write_config(cfg)  # with the first checkpoint: a failed start leaves no config behind
        if writer:
            rd.append_metrics(row)
        rows += 1
        # best-validation checkpoint of the fine-tuning phase (after the final pruning)
        if phase == "finetune" or (cfg.finetune_epochs == 0 and epoch == total_epochs - 1):
            if best is None or val_acc > best["val_acc"]:
                best = {"val_acc": val_acc, "epoch": epoch + 1, "model": copy.deepcopy(model.state_dict())}
        epochs_bar.set_postfix(val_acc=f"{val_acc:.4f}", comp=f"{100 * row['param_compression']:.1f}%")
        if writer:
            rd.save(
                dict(
                    model=model.state_dict(),
                    optimizer=opt.state_dict(),
                    rng=_rng_state(),
                    epoch=epoch + 1,
                    metric_rows=rows,
                    best=best,
                    kept_index=kept_index,
                    elapsed=time.time() - t_start,
                    **({} if rng_ranks is None else {"rng_ranks": rng_ranks}),
                )
            )
    if best is not None:
        model.load_state_dict(best["model"])
    test_loss, test_acc = evaluate(model, splits.test, device)
    rep = _report(model, cfg, example)
    summary = dict(
        config=files.recorded(asdict(cfg)),
        test_acc=test_acc,
        test_loss=test_loss,
        best_epoch=best["epoch"] if best else total_epochs,
        best_val_acc=best["val_acc"] if best else None,
        param_compression=1 - rep.params_kept / params_dense,
        structure_compression=rep.structure_compression,
        params_dense=params_dense,
        params_kept=rep.params_kept,
        layers=[asdict(r) for r in rep.layers],
        wall_time_s=time.time() - t_start,
        machine=f"{platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}, device {device}",
        world_size=cfg.world_size,
    )
    if cfg.method == "bmrs_n" and cfg.compression is None and criterion_of(cfg).threshold > REFERENCE_THRESHOLD:
        # what the reference implementation's dF offset would prune on the final model
        ref = crit.prune(copy.deepcopy(model), "bmrs_n", threshold=REFERENCE_THRESHOLD, example_inputs=example)
        summary["reference_offset"] = dict(
            threshold=REFERENCE_THRESHOLD,
            param_compression=1 - ref.params_kept / params_dense,
            structure_compression=ref.structure_compression,
        )
    summary["size_speed"] = _size_speed(model, example, splits, cfg.measure_latency) if cfg.method != "dense" and writer else None
    if not writer:
        return summary
    files.write_json(rd.summary, summary)
    with contextlib.suppress(OSError):
        rd.previous.unlink()  # checkpoint.pt is the final state; its predecessor is no longer needed
    return summary


def _size_speed(model, example, splits, latency: bool = True) -> dict | None:
    try:
        from ..benchmarking import size_speed_report
        from ..removal import shrink
    except ImportError:
        return None
    model_cpu = copy.deepcopy(model).cpu().eval()
    small = shrink(model_cpu, example.cpu())
    dense = copy.deepcopy(model_cpu)
    from ..noise import remove_noise

    remove_noise(dense)
    return size_speed_report(dense, small, example.cpu(), **({} if latency else {"batch_sizes": ()})).to_dict()


def _shrink_step(model, opt, example, cfg, kept_index):
    """Physically remove masked structures during training.  The optimiser is rebuilt on the
    new parameters with the old one's state (Adam's moments and step) at the kept entries, so
    training goes on as it would have on the masked network."""
    before = {n.layer_name: (n.mask.detach().cpu() != 0) for n in noise_layers(model)}
    old_model, old_opt = model, opt
    model = _shrink_for_training(model, example)
    after = {n.layer_name: n.num_structures for n in noise_layers(model)}
    if kept_index is not None:
        new = {}
        for name, keep in before.items():
            idx = kept_index[name]
            if after[name] == int(keep.sum()):
                new[name] = [i for i, k in zip(idx, keep.tolist()) if k]
            elif after[name] == len(idx):
                new[name] = idx
            else:  # coupled structures were kept: which ones is not recorded
                new = None
                break
        kept_index = new
    opt = _optimizer(model, cfg)
    from ..removal import carry_optimizer_state

    carry_optimizer_state(old_model, old_opt, model, opt)
    return model, opt, kept_index


def _rebuild_shrunk(model, example, kept_index):
    for n in noise_layers(model):
        mask = torch.zeros_like(n.mask)
        mask[kept_index[n.layer_name]] = 1
        n.mask.copy_(mask)
    return _shrink_for_training(model, example)


# ---------------------------------------------------------------------------------------------
def run_sweep(cfg: RunConfig, progress: bool = True) -> dict:
    """Post-training pruning: train (method "none"), then sweep compression per criterion.

    A finished sweep (its ``sweep.json``) is only read; otherwise the sweep directory is locked
    for the training (in ``train/``, a run directory of its own) and the sweep."""
    cfg.validate()
    rd = RunDir(cfg.out_dir)
    out_path = rd.path / "sweep.json"
    done = _finished_sweep(out_path, cfg)
    if done is not None:
        return done
    with rd.locked():
        return _finished_sweep(out_path, cfg) or _run_sweep(cfg, out_path, progress)


def _finished_sweep(path: Path, cfg: RunConfig) -> dict | None:
    if not path.exists():
        return None
    done = files.read_json(path)
    diff = config_difference(done.get("config", {}), asdict(cfg))
    if diff:
        raise ValueError(f"{path} holds a sweep with another configuration ({diff}); "
                         "use another --out-dir or delete the directory")
    return done


def _run_sweep(cfg: RunConfig, out_path: Path, progress: bool) -> dict:
    base_cfg = copy.deepcopy(cfg)
    base_cfg.method = "none"
    base_cfg.finetune_epochs = 0
    base_cfg.out_dir = str(Path(cfg.out_dir) / "train")
    train = run_continuous(base_cfg, progress=progress)
    t_sweep = time.time()
    device = _device(cfg.device)
    splits = load_splits(cfg)
    _seed_all(cfg.seed)
    model, example = _build(base_cfg, splits, device)
    trained = RunDir(base_cfg.out_dir)
    state = trained.load()
    if state is None:
        raise CheckpointError(f"{trained.checkpoint} is missing although {trained.summary} exists: delete {trained.path} to train again")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{trained.loaded_from} does not fit this run's model ({str(e).splitlines()[0]}); "
                              f"delete {trained.path} to train again") from None
    params_dense = count_parameters(model)
    results: list[dict] = []
    stops: dict[str, dict] = {}
    bar = tqdm(total=len(cfg.sweep_criteria) * len(cfg.sweep_points), desc="sweep", disable=not progress)
    for criterion in cfg.sweep_criteria:
        for point in cfg.sweep_points:
            m = copy.deepcopy(model)
            rep = crit.prune(m, criterion, compression=point, example_inputs=example, **_precision(criterion, cfg))
            acc = _finetune_and_test(m, cfg, splits, device)
            results.append(dict(criterion=criterion, target=point, param_compression=1 - rep.params_kept / params_dense, structure_compression=rep.structure_compression, test_acc=acc))
            bar.update(1)
        if criterion in ("bmrs_n", "bmrs_u"):
            # the stop point: prune where dF >= 0 (and, for BMRS_N, at the reference code's threshold)
            variants = [(criterion, 0.0)] + ([("bmrs_n (reference)", REFERENCE_THRESHOLD)] if criterion == "bmrs_n" else [])
            for label, thr in variants:
                m = copy.deepcopy(model)
                rep = crit.prune(m, criterion, threshold=thr, example_inputs=example, **_precision(criterion, cfg))
                acc = _finetune_and_test(m, cfg, splits, device)
                stops[label] = dict(param_compression=1 - rep.params_kept / params_dense, structure_compression=rep.structure_compression, test_acc=acc, threshold=thr)
    bar.close()
    summary = dict(config=files.recorded(asdict(cfg)), points=results, stops=stops,
                   train_wall_time_s=train.get("wall_time_s"), sweep_wall_time_s=time.time() - t_sweep)
    files.write_json(out_path, summary)
    return summary


def _precision(criterion: str, cfg: RunConfig) -> dict:
    return {"precision": cfg.precision} if criterion == "bmrs_u" else {}


def _finetune_and_test(model, cfg, splits, device) -> float:
    torch.manual_seed(cfg.seed)  # the same noise draws at every point of every criterion
    if cfg.sweep_finetune_epochs > 0:
        opt = _optimizer(model, cfg)
        for e in range(cfg.sweep_finetune_epochs):
            loader = make_loader(splits.train, cfg.batch_size, shuffle=True, seed=cfg.seed * 7919 + e)
            _train_epoch(model, opt, loader, cfg, splits.num_train, device, f"fine-tune {e + 1}")
    return evaluate(model, splits.test, device)[1]
