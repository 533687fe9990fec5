"""Several continuous runs of one small network trained as one batched ensemble (docs/scale-out.md).

:func:`run_ensemble` takes K run configurations that share a network and its training
hyperparameters (seeds and pruning methods may differ) and returns their K summaries, written to
their K run directories exactly as :func:`training.run_continuous` writes them, because it *is*
run_continuous for every member: each member runs in a thread of its own, one member at a time,
and only its training epochs are replaced (``training.EPOCH_RUNNER``) by one batched epoch of all
members waiting for one.  Pruning, evaluation, checkpoints, resume and summaries are each
member's own code.

The batched epoch (:class:`_Batch`) stacks the members' parameters (``[K, ...]``), keeps the
members' training images on the device (gathered per step by one index operation), and runs
``nn.Sequential`` networks of Linear, Conv2d, pooling, Flatten and element-wise activations as
batched matrix products and grouped convolutions.  Member k's numbers are those of its single
run (to float rounding):

* its mini-batches come from its own loader (the same DataLoader seed and sampler);
* its noise uniforms are drawn from its own generator, holding the state its single run's global
  generator would hold, in the single run's layout (one ``[batch, all structures]`` draw a step,
  as the noise layers' joint draw), then ``theta = draw_theta(mu, sigma, mask, u)``;
* its loss is ``CE_k + KL_k`` with its own KL weighting, and the ensemble minimises the sum over
  members, so member k's gradient is its single run's;
* Adam is element-wise, so one Adam on the stacked parameters (the members' state and
  hyperparameters) takes each member's own step.

A step whose loss is not finite (or absurd) stops the batched epoch; the members then train that
epoch one by one with the ordinary code, from the same state, so a diverged member fails with its
single run's error and the others go on.  Networks with noise shared per element, shrinking
during training, or data sets not held in memory are refused (:func:`check_members`).
"""

from __future__ import annotations

import contextvars
import copy
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import kl_divergence

from ..distributions import LogUniform, TruncatedLogNormal, draw_theta
from ..noise import noise_layers
from . import bf_training, training

__all__ = ["run_ensemble", "run_bf_ensemble", "bf_probe", "check_members", "check_bf_members", "check_network", "SHARED_FIELDS",
           "BF_SHARED_FIELDS", "probe", "Probe", "wall_clock", "MAX_MEMBERS", "PROBE_STEPS",
           "PROBE_REPEATS"]

#: RunConfig fields that members of one ensemble share (seed, method and its rule may differ)
SHARED_FIELDS = ("dataset", "model", "width", "extra_layers", "epochs", "finetune_epochs", "batch_size", "lr",
                 "noise_lr", "kl_weighting", "kl_scale", "sharing", "val_fraction", "device", "data_dir", "world_size")
_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Identity)
_PER_EXAMPLE = (nn.MaxPool2d, nn.AvgPool2d, nn.Flatten)


def check_members(cfgs) -> None:
    """ValueError naming the field and the members if ``cfgs`` cannot train as one ensemble."""
    if not cfgs:
        raise ValueError("an ensemble needs at least one run configuration")
    first = asdict(cfgs[0])
    for i, cfg in enumerate(cfgs):
        cfg.validate()
        d = asdict(cfg)
        for f in SHARED_FIELDS:
            if d[f] != first[f]:
                raise ValueError(f"ensemble member {i} ({cfg.out_dir}) has {f}={d[f]!r} but member 0 has {first[f]!r}: "
                                 f"members share {', '.join(SHARED_FIELDS)}")
        if cfg.shrink:
            raise ValueError(f"ensemble member {i} ({cfg.out_dir}) shrinks during training (--shrink): its network "
                             "changes shape, so it cannot be stacked with the others; run it on its own")
        if cfg.sharing == "element" and cfg.method != "dense":
            raise ValueError(f"ensemble member {i} ({cfg.out_dir}): sharing 'element' is not supported by the ensemble")
    dirs = [str(c.out_dir) for c in cfgs]
    twice = sorted({d for d in dirs if dirs.count(d) > 1})
    if twice:
        raise ValueError(f"ensemble members share the run directory {twice[0]}")


#: BayesFactorRunConfig fields that members of one Bayes-factor ensemble share (the mode,
#: sparsity, gate and its settings, and the seed may differ)
BF_SHARED_FIELDS = ("dataset", "model", "data_dir", "epochs", "batch_size", "lr", "device")


def check_bf_members(cfgs) -> None:
    """ValueError naming the field and the members if ``cfgs`` (BayesFactorRunConfigs) cannot
    train as one ensemble, or if their network is not one the ensemble batches."""
    from .models import build_model

    if not cfgs:
        raise ValueError("an ensemble needs at least one run configuration")
    first = asdict(cfgs[0])
    for i, cfg in enumerate(cfgs):
        d = asdict(cfg)
        for f in BF_SHARED_FIELDS:
            if d[f] != first[f]:
                raise ValueError(f"ensemble member {i} ({bf_training.bf_run_dir(cfg)}) has {f}={d[f]!r} but member 0 has "
                                 f"{first[f]!r}: members share {', '.join(BF_SHARED_FIELDS)}")
    dirs = [str(bf_training.bf_run_dir(c)) for c in cfgs]
    twice = sorted({d for d in dirs if dirs.count(d) > 1})
    if twice:
        raise ValueError(f"ensemble members share the run directory {twice[0]}")
    check_network(build_model(cfgs[0].model, 1, 28, 10))  # the layer types, whatever the data set's shape


def check_network(model: nn.Module) -> None:
    """ValueError naming the layer if ``model`` is not a network the ensemble batches: an
    ``nn.Sequential`` of Linear, Conv2d, pooling, Flatten and element-wise activations."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"the ensemble trains nn.Sequential networks; {type(model).__name__} is not one")
    for name, mod in model.named_children():
        if not isinstance(mod, (nn.Linear, nn.Conv2d) + _ELEMENTWISE + _PER_EXAMPLE):
            raise ValueError(f"the ensemble cannot batch layer {name} ({type(mod).__name__})")


# ---------------------------------------------------------------------------------------------
class _Member:
    """One run in a thread of its own: ``kind.run(cfg)`` with ``kind.runner`` (the training
    loop's epoch hook) set to hand each training epoch to the coordinator."""

    def __init__(self, index: int, cfg, kind: "_Kind"):
        self.index, self.cfg, self.kind = index, cfg, kind
        self.to_member = threading.Semaphore(0)
        self.to_coordinator = threading.Semaphore(0)
        self.request = None  # (args, rng state) while it waits for a training epoch
        self.outcome = None  # (result, exception) of the epoch it waited for
        self.rng_after = None
        self.done = False
        self.result = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=f"ensemble member {index}", daemon=True)

    def _main(self) -> None:
        self.kind.runner.set(self._epoch)
        try:
            self.result = self.kind.run(self.cfg)
        except BaseException as e:  # noqa: BLE001 - handed to the caller with the member
            self.error = e
        finally:
            self.done = True
            self.to_coordinator.release()

    def _epoch(self, *args):
        """The epoch hook of this member: hand the epoch to the coordinator and wait."""
        self.request = (args, training._rng_state())
        self.to_coordinator.release()
        self.to_member.acquire()
        result, error = self.outcome
        self.request = self.outcome = None
        if error is not None:
            raise error
        return result

    def run_until_it_waits(self) -> None:
        """Let the member's thread run (alone) until it asks for its next epoch or ends."""
        if self.thread.ident is None:
            self.thread.start()
        else:
            self.to_member.release()
        self.to_coordinator.acquire()


def run_ensemble(cfgs, progress: bool = False) -> list:
    """Train ``cfgs`` (RunConfigs, see :data:`SHARED_FIELDS`) as one ensemble; returns, per
    member, its summary dict or the exception its run raised (the others go on).  ``progress``
    is accepted for the engines' signature; the members run without progress bars."""
    cfgs = list(cfgs)
    check_members(cfgs)
    return _coordinate([_Member(i, cfg, _BMRS) for i, cfg in enumerate(cfgs)])


def run_bf_ensemble(cfgs) -> list:
    """Train ``cfgs`` (BayesFactorRunConfigs of one network, data set and training, see
    :data:`BF_SHARED_FIELDS`; modes, sparsities, gates and seeds may differ) as one ensemble:
    each member is :func:`bf_training.run_bayes_factor` with only its training epochs batched
    (:class:`_PlainBatch`).  Returns, per member, its summary or the exception its run raised."""
    cfgs = list(cfgs)
    check_bf_members(cfgs)
    cache: dict = {}  # one load of each (data set, folder, seed), shared by the members' threads
    kind = _Kind(lambda cfg: bf_training.run_bayes_factor(cfg, data_cache=cache), bf_training.EPOCH_RUNNER,
                 bf_training._train_epoch, _PlainBatch)
    return _coordinate([_Member(i, cfg, kind) for i, cfg in enumerate(cfgs)])


def _coordinate(members) -> list:
    """Run ``members`` one at a time until each waits for an epoch, train the epochs of those
    that can share one batched (per :func:`_groups`), repeat until every member has ended."""
    state = training._rng_state()
    try:
        for m in members:  # set-up one member at a time: each seeds and builds with the global generator
            m.run_until_it_waits()
        while True:
            waiting = [m for m in members if not m.done]
            if not waiting:
                break
            for group in _groups(waiting):
                _train_group(group)
            for m in waiting:
                training._set_rng_state(m.rng_after)
                m.run_until_it_waits()
    finally:
        training._set_rng_state(state)
    return [m.error if m.error is not None else m.result for m in members]


def _key(member):
    batch = getattr(member, "kind", _BMRS).batch
    model, opt, _loader, device, extra = batch.unpack(member.request[0])
    shapes = tuple((n, tuple(t.shape)) for n, t in model.state_dict().items())
    steps = tuple(float(s["step"]) for s in opt.state.values() if "step" in s)
    hyper = tuple(tuple(sorted((k, repr(v)) for k, v in g.items() if k != "params")) for g in opt.param_groups)
    return shapes, steps, hyper, str(device), extra


def _groups(members) -> list[list]:
    """Members that can take their epoch together: same shapes, Adam step count and options."""
    out: dict = {}
    for m in members:
        out.setdefault(_key(m), []).append(m)
    return list(out.values())


def _train_group(group) -> None:
    kind = group[0].kind
    try:
        results, rng_after = kind.batch(group).epoch()
    except _Fallback:
        results = rng_after = None
    if results is None:  # every member trains this epoch with the ordinary code, from the same state
        for m in group:
            args, rng = m.request
            training._set_rng_state(rng)
            try:
                m.outcome = (kind.single(*args), None)
            except Exception as e:  # noqa: BLE001 - the member's own error, raised in its thread
                m.outcome = (None, e)
            m.rng_after = training._rng_state()
        return
    for m, r, rng in zip(group, results, rng_after):
        m.outcome, m.rng_after = (r, None), rng


class _Fallback(Exception):
    """The batched epoch stopped (a non-finite or absurd loss): train the members one by one."""


# ---------------------------------------------------------------------------------------------
class _Batch:
    """One training epoch of the members of ``group`` as one stacked network (BMRS runs:
    noise, cross-entropy + KL; the epoch's result is training._train_epoch's)."""

    #: whether the members' loaders are iterated through a progress bar (training._train_epoch's)
    through_bar = True

    @staticmethod
    def unpack(args):
        """(model, optimizer, loader, device, what else members must share) of an epoch's
        arguments: training._train_epoch's ``(model, opt, loader, cfg, num_train, device, desc)``."""
        model, opt, loader, cfg, num_train, device, _desc = args
        return model, opt, loader, device, (num_train, cfg.kl_weighting, cfg.kl_scale)

    def __init__(self, group):
        self.group = group
        args = [m.request[0] for m in group]
        parts = [self.unpack(a) for a in args]
        self.models = [p[0] for p in parts]
        self.opts = [p[1] for p in parts]
        self.loaders = [p[2] for p in parts]
        self.device = parts[0][3]
        self.rng = [m.request[1] for m in group]
        self.k = len(group)
        base = self.models[0]
        check_network(base)
        self.names = [n for n, _ in base.named_parameters()]
        self.stacked = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in self.models]).requires_grad_()
                        for n in self.names}
        self.layers = noise_layers(base)
        self.masks = [torch.stack([noise_layers(m)[i].mask for m in self.models]) for i in range(len(self.layers))]
        self.targets = {n.target_name: i for i, n in enumerate(self.layers)}
        self.setup(args[0])

    def setup(self, args) -> None:
        """What the loss needs beyond the stacked network, from member 0's epoch arguments."""
        self.cfg, self.num_train = args[3], args[4]

    # -- the forward pass of all members: activations [K, batch, ...] ------------------------
    def _linear(self, prefix, h):
        w, b = self.stacked[prefix + "weight"], self.stacked.get(prefix + "bias")
        out = torch.bmm(h, w.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        return out

    def _conv(self, prefix, mod: nn.Conv2d, h):
        k, b = h.shape[:2]
        w, bias = self.stacked[prefix + "weight"], self.stacked.get(prefix + "bias")
        x = h.transpose(0, 1).reshape(b, k * h.shape[2], *h.shape[3:])
        pad = mod.padding if isinstance(mod.padding, str) or mod.padding_mode == "zeros" else None
        if pad is None:
            raise ValueError(f"the ensemble supports zero padding only; layer {prefix[:-1]} uses {mod.padding_mode!r}")
        out = F.conv2d(x, w.flatten(0, 1), None if bias is None else bias.flatten(), mod.stride, pad, mod.dilation,
                       mod.groups * k)
        return out.view(b, k, -1, *out.shape[2:]).transpose(0, 1)

    def _theta(self, batch: int, generators):
        """[K, batch, all structures] of the members' draws (each from its own generator)."""
        if not self.layers:
            return None
        first = self.layers[0]
        mu = torch.cat([self.stacked[f"{n.layer_name}.bayes_noise.mu"] for n in self.layers], dim=1)
        log_sigma = torch.cat([self.stacked[f"{n.layer_name}.bayes_noise.log_sigma"] for n in self.layers], dim=1)
        mask = torch.cat(self.masks, dim=1)
        dtype = torch.float32 if mu.dtype in (torch.float16, torch.bfloat16) else mu.dtype
        shared = first.sharing == "structure"
        u = torch.stack([torch.rand((1 if shared else batch, mu.shape[1]), dtype=dtype, device=self.device, generator=g)
                         for g in generators])
        sigma = log_sigma.clamp(*first.log_sigma_bounds).exp().to(dtype)
        theta = draw_theta(mu.to(dtype).unsqueeze(1), sigma.unsqueeze(1), mask.to(dtype).unsqueeze(1), u, first.a, first.b)
        return theta.split([n.num_structures for n in self.layers], dim=2)

    def _forward(self, x, generators):
        thetas = self._theta(x.shape[1], generators)
        h = x
        for name, mod in self.models[0].named_children():
            if isinstance(mod, nn.Linear):
                h = self._linear(name + ".", h)
            elif isinstance(mod, nn.Conv2d):
                h = self._conv(name + ".", mod, h)
            else:  # per example, on [K * batch, ...]; .forward: without the member's noise hook
                h = mod.forward(h.flatten(0, 1)).unflatten(0, h.shape[:2])
            i = self.targets.get(name)
            if i is not None:
                n = self.layers[i]
                axis = 1 + (n.dim % (h.ndim - 1))  # the single network's structure axis, after K
                shape = [h.shape[0], h.shape[1] if n.sharing == "channel" else 1] + [1] * (h.ndim - 2)
                shape[axis] = n.num_structures
                h = h * thetas[i].reshape(shape).to(h.dtype)
        return h

    def _kl(self):
        """[K] of each member's kl_scale x kl(model, weighting, num_train) (noise.kl's weightings)."""
        per_layer = []
        for n in self.layers:
            mu = self.stacked[f"{n.layer_name}.bayes_noise.mu"]
            sigma = self.stacked[f"{n.layer_name}.bayes_noise.log_sigma"].clamp(*n.log_sigma_bounds).exp()
            q = TruncatedLogNormal(mu, sigma, n.a, n.b)
            per_layer.append((kl_divergence(q, LogUniform(n.a, n.b, batch_shape=mu.shape)).to(mu.dtype), n))
        w = self.cfg.kl_weighting
        if w == "mean":
            k = sum(k.double().sum(1) / n.initial_structures for k, n in per_layer).div(len(per_layer)).to(per_layer[0][0].dtype)
        else:
            total = sum(k.sum(1) for k, _ in per_layer)
            k = total / self.num_train if w == "elbo" else total
        return k * self.cfg.kl_scale if self.cfg.kl_scale != 1 else k

    # -- the epoch ----------------------------------------------------------------------------
    def _adam(self):
        """One Adam on the stacked parameters with the members' options and state."""
        by_id = [{id(p): n for n, p in m.named_parameters()} for m in self.models]
        groups = []
        for g in self.opts[0].param_groups:
            groups.append(dict({k: v for k, v in g.items() if k != "params"},
                               params=[self.stacked[by_id[0][id(p)]] for p in g["params"]]))
        adam = type(self.opts[0])(groups)
        for name in self.names:
            states = [o.state.get(dict(m.named_parameters())[name]) for o, m in zip(self.opts, self.models)]
            if states[0]:
                adam.state[self.stacked[name]] = {
                    key: (states[0][key].clone() if key == "step" else torch.stack([s[key] for s in states]))
                    for key in states[0]}
        return adam

    def _batches(self):
        """Per step, the members' images [K, b, ...] and labels [K, b], gathered on the device
        from the members' training sets (copied there once) with their own loaders' indices."""
        sets = [loader.dataset for loader in self.loaders]
        if not all(hasattr(d, "images") for d in sets):
            raise ValueError("the ensemble needs data sets held in memory (ImageTensorDataset)")
        images = _resident([d.images for d in sets], self.device)
        labels = _resident([d.labels for d in sets], self.device)
        offsets = [sum(len(d) for d in sets[:i]) for i in range(len(sets))]
        steps = [list(_indices(loader, self.through_bar)) for loader in self.loaders]
        if len({len(s) for s in steps}) != 1:
            raise ValueError("ensemble members take different numbers of steps an epoch")
        for per_member in zip(*steps):
            idx = torch.stack([torch.as_tensor(i) + o for i, o in zip(per_member, offsets)]).to(self.device)
            yield images[idx], labels[idx]

    def epoch(self):
        generators = []
        for rng in self.rng:
            g = torch.Generator(self.device)
            g.set_state(rng["torch"] if self.device.type == "cpu" else rng["cuda"][_cuda_index(self.device)])
            generators.append(g)
        adam = self._adam()
        for m in self.models:
            m.train()
        sums, steps = None, 0
        for x, y in self._batches():
            logits = self._forward(x, generators)
            b = y.shape[1]
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(self.k, b).mean(1)
            loss, record = self._loss(ce, b)
            if not bool((torch.isfinite(loss) & (ce <= training.MAX_CROSS_ENTROPY)).all()):
                raise _Fallback
            adam.zero_grad(set_to_none=True)
            loss.sum().backward()
            adam.step()
            self._after_step(adam)
            record = record.to(torch.float64)
            sums = record if sums is None else sums + record
            steps += 1
        self._write_back(adam)
        results = self._results(sums, steps)
        rng_after = []
        for rng, g in zip(self.rng, generators):
            new = dict(rng, cuda=list(rng["cuda"]))
            if self.device.type == "cpu":
                new["torch"] = g.get_state()
            else:
                new["cuda"][_cuda_index(self.device)] = g.get_state()
            rng_after.append(new)
        return results, rng_after

    def _loss(self, ce, batch: int):
        """[K] losses to minimise and the [K, ...] of what the epoch's result averages."""
        k = self._kl() if self.layers else torch.zeros(self.k, device=ce.device)
        loss = ce + k
        return loss, torch.stack([loss.detach(), ce.detach(), k.detach()], dim=1)

    def _after_step(self, adam) -> None:
        """Anything the members' optimizers do after a step (nothing for BMRS runs)."""

    def _results(self, sums, steps: int) -> list:
        """Per member, what its ordinary epoch returns: (loss, CE, KL) means over the steps."""
        return [tuple((s / steps).tolist()) for s in sums]

    @torch.no_grad()
    def _write_back(self, adam) -> None:
        """The stacked parameters, gradients and Adam state back into each member's own."""
        for i, (model, opt) in enumerate(zip(self.models, self.opts)):
            params = dict(model.named_parameters())
            for name in self.names:
                p, s = params[name], self.stacked[name]
                p.copy_(s[i])
                p.grad = None if s.grad is None else s.grad[i].clone()
                state = adam.state.get(s)
                if state:
                    opt.state[p] = {key: (v.clone() if key == "step" else v[i].clone()) for key, v in state.items()}


class _PlainBatch(_Batch):
    """One training epoch of Bayes-factor runs (bf_training._train_epoch) as one stacked
    network: no noise, the mean cross-entropy per member, and after each Adam step each member's
    pruned weights (and their Adam moments) set to zero, as its pruner's post-step hook does
    (WeightMasks.apply); their gradients are masked too, as its gradient hooks do.  The result
    is each member's mean training loss per example."""

    through_bar = False

    @staticmethod
    def unpack(args):
        """bf_training._train_epoch's ``(model, optimizer, loader, device, masks)``."""
        model, opt, loader, device, masks = args
        return model, opt, loader, device, len(loader.dataset)

    def setup(self, args) -> None:
        per_member: dict = {}  # stacked parameter name -> {member: its mask}
        for k, model in enumerate(self.models):
            masks = self.group[k].request[0][4]
            if masks is not None:
                names = {id(p): n for n, p in model.named_parameters()}
                for layer, w in masks.weights.items():
                    per_member.setdefault(names[id(w)], {})[k] = masks.mask(layer)
        self.zeroed = {}  # stacked parameter name -> [K, ...] masks (ones for members without)
        for n, ms in per_member.items():
            p = self.stacked[n]
            self.zeroed[n] = torch.stack([ms[k].to(p.dtype) if k in ms else torch.ones_like(p[k]) for k in range(self.k)])
        for n, m in self.zeroed.items():
            self.stacked[n].register_hook(lambda grad, m=m: grad * m)

    def _loss(self, ce, batch: int):
        return ce, ce.detach().unsqueeze(1) * batch

    @torch.no_grad()
    def _after_step(self, adam) -> None:
        for n, m in self.zeroed.items():
            p = self.stacked[n]
            p.mul_(m)
            for value in adam.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value.mul_(m)

    def _results(self, sums, steps: int) -> list:
        n = len(self.loaders[0].dataset)
        return [float(s[0]) / max(1, n) for s in sums]


@dataclass(frozen=True)
class _Kind:
    """One kind of run the coordinator batches: its run function, the epoch hook of its
    training loop, its ordinary epoch (the fall-back) and its batched epoch."""

    run: object
    runner: contextvars.ContextVar
    single: object
    batch: type


_BMRS = _Kind(lambda cfg: training.run_continuous(cfg, progress=False), training.EPOCH_RUNNER, training._train_epoch, _Batch)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


_RESIDENT: dict = {}


def _resident(tensors, device):
    """The members' tensors concatenated on ``device``, kept between epochs (same tensors)."""
    key = (tuple(id(t) for t in tensors), str(device))
    hit = _RESIDENT.get(key)
    if hit is None or any(a is not b for a, b in zip(hit[0], tensors)):
        _RESIDENT.clear()
        hit = _RESIDENT[key] = (list(tensors), torch.cat(list(tensors)).to(device))
    return hit[1]


class _IndexSet(torch.utils.data.Dataset):
    """Stands in for a loader's data set: an index (list) is returned as it is."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        return torch.as_tensor(index)


def _indices(loader, through_bar: bool = True):
    """The index batches ``loader`` would gather in its epoch: a DataLoader with the same sampler
    and generator, iterated (``through_bar``, as in ``training._train_epoch``) through the same
    progress bar (tqdm.auto's creates an iterator of its own first, which draws one more
    DataLoader seed from the generator) or directly (``bf_training._train_epoch``)."""
    index_loader = torch.utils.data.DataLoader(_IndexSet(len(loader.dataset)), sampler=loader.sampler,
                                               batch_size=None, generator=loader.generator)
    return training.tqdm(index_loader, disable=True, leave=False) if through_bar else index_loader


# ---------------------------------------------------------------------------------------------
# the probe of ``reproduce --ensemble auto``: is one ensemble faster than its single runs, here?

#: most members ``reproduce --ensemble auto`` puts in one ensemble (14 = the 7 methods of the BMRS
#: Table 1 x 2 seeds fit one); fewer where the device's free memory does not hold them
MAX_MEMBERS = 16
#: training steps of each side of the probe (after one warm-up pass of each, not timed)
PROBE_STEPS = 8
#: timed passes of each side, alternating which goes first; the medians are compared
PROBE_REPEATS = 3


@dataclass(frozen=True)
class Probe:
    """What :func:`probe` measured: ``size`` members (at most ``max_members``, what the device's
    memory holds), the median seconds of ``steps`` steps of the ``size`` single runs one after
    another and of the one ensemble, ``ratio`` = single / ensemble (above 1: the ensemble is
    faster); ``error``: why the group cannot train batched (then ``ratio`` is None)."""

    size: int
    steps: int
    repeats: int = PROBE_REPEATS
    single_s: float | None = None
    ensemble_s: float | None = None
    max_members: int | None = None
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        return None if self.error is not None or not self.ensemble_s else self.single_s / self.ensemble_s

    @property
    def batched(self) -> bool:
        return self.ratio is not None and self.ratio > 1


def wall_clock(kind: str, work) -> float:
    """The probe's default timer: seconds of ``work()`` (which ends with a device sync);
    ``kind`` ("single" or "ensemble") says which side it is."""
    t0 = time.perf_counter()
    work()
    return time.perf_counter() - t0


def probe(cfgs, *, steps: int = PROBE_STEPS, repeats: int = PROBE_REPEATS, timer=wall_clock, share: int = 1) -> Probe:
    """Time ``steps`` training steps of the members ``cfgs`` (RunConfigs that could share an
    ensemble) as one batched ensemble against the same steps of each as its single run, on the
    runs' own network, device, batch size and data (the first ``steps`` batches of the training
    set), from the same initial states; one untimed warm-up pass of each side, then ``repeats``
    timed passes alternating which side goes first.  ``timer(kind, work)`` returns the seconds
    of ``work()``.  Members beyond what half of the device's free memory, shared by ``share``
    parallel tasks, holds are left out of the probe (``Probe.max_members``).  The runs' state is
    untouched: the probe builds its own copies, and the global generators are restored."""
    cfgs = list(cfgs)
    try:
        check_members(cfgs)
    except ValueError as e:
        return Probe(len(cfgs), steps, repeats, error=str(e))
    state = training._rng_state()
    try:
        return _probe(cfgs, steps, repeats, timer, share)
    finally:
        training._set_rng_state(state)
        _RESIDENT.clear()


def _probe(cfgs, steps, repeats, timer, share) -> Probe:
    from .data import ImageTensorDataset, make_loader

    first = cfgs[0]
    device = training._device(first.device)
    splits = training.load_splits(first)
    if not hasattr(splits.train, "images"):
        return Probe(len(cfgs), steps, repeats, error="the ensemble needs data sets held in memory (ImageTensorDataset)")
    built = []
    for cfg in cfgs:
        training._seed_all(cfg.seed)
        model, _ = training._build(cfg, splits, device)
        if not built:
            try:
                check_network(model)
            except ValueError as e:  # before building the others
                return Probe(len(cfgs), steps, repeats, error=str(e))
        built.append((cfg, model, training._optimizer(model, cfg)))
    fits = _members_that_fit(built[0][1], splits, first.batch_size, device, share)
    if fits < 2:
        return Probe(len(cfgs), steps, repeats, max_members=fits,
                     error=f"half of the free memory of {device}, shared by {share} task(s), holds one member only")
    built = built[:fits]
    n = min(len(splits.train), steps * first.batch_size)
    data = ImageTensorDataset(splits.train.images[:n], splits.train.labels[:n])
    steps = -(-n // first.batch_size)

    def fresh():
        out = []
        for cfg, model, opt in built:
            m = copy.deepcopy(model)
            o = training._optimizer(m, cfg)
            o.load_state_dict(opt.state_dict())
            out.append((cfg, m, o, make_loader(data, cfg.batch_size, shuffle=True, seed=cfg.seed)))
        return out

    def single():
        runs = fresh()

        def work():
            for cfg, m, o, loader in runs:
                training._train_epoch(m, o, loader, cfg, splits.num_train, device, "probe")
            _sync(device)
        return work

    def batched():
        rng = training._rng_state()
        waiting = [_Waiting((m, o, loader, cfg, splits.num_train, device, "probe"), rng) for cfg, m, o, loader in fresh()]
        batches = [_Batch(g) for g in _groups(waiting)]  # raises ValueError for a network it cannot batch

        def work():
            for b in batches:
                b.epoch()
            _sync(device)
        return work

    return _timed(single, batched, len(built), steps, repeats, timer, device, fits)


def _timed(single, batched, size: int, steps: int, repeats: int, timer, device, fits) -> Probe:
    """The probe's timing: ``single()`` and ``batched()`` each return a fresh ``work`` callable;
    one untimed warm-up of each, then ``repeats`` timed passes alternating which goes first."""
    try:
        batched()()
    except (ValueError, _Fallback) as e:
        what = "a non-finite or absurd loss" if isinstance(e, _Fallback) else str(e)
        return Probe(size, steps, repeats, max_members=fits, error=what)
    single()()
    times: dict = {"single": [], "ensemble": []}
    for r in range(repeats):
        for kind in (("single", "ensemble") if r % 2 == 0 else ("ensemble", "single")):
            work = single() if kind == "single" else batched()
            _sync(device)
            times[kind].append(float(timer(kind, work)))
    return Probe(size, steps, repeats, statistics.median(times["single"]), statistics.median(times["ensemble"]), fits)


def bf_probe(cfgs, *, steps: int = PROBE_STEPS, repeats: int = PROBE_REPEATS, timer=wall_clock) -> Probe:
    """:func:`probe` for Bayes-factor runs (BayesFactorRunConfigs that could share an ensemble,
    at most MAX_MEMBERS of them): ``steps`` training steps of each member's network alone
    (bf_training._train_epoch) against one batched epoch of all (:class:`_PlainBatch`), on the
    runs' network, device, batch size and the first ``steps`` batches of member 0's training set;
    without masks on either side (the pruners' masking is a few multiplications a step)."""
    from .data import ImageTensorDataset, load_dataset, make_loader
    from .models import build_model

    cfgs = list(cfgs)[:MAX_MEMBERS]
    try:
        check_bf_members(cfgs)
    except ValueError as e:
        return Probe(len(cfgs), steps, repeats, error=str(e))
    state = training._rng_state()
    try:
        first = cfgs[0]
        device = training._device(first.device)
        splits = load_dataset(first.dataset, first.data_dir, seed=first.seed)
        if not hasattr(splits.train, "images"):
            return Probe(len(cfgs), steps, repeats, error="the ensemble needs data sets held in memory (ImageTensorDataset)")
        n = min(len(splits.train), steps * first.batch_size)
        data = ImageTensorDataset(splits.train.images[:n], splits.train.labels[:n])
        built = []
        for cfg in cfgs:
            torch.manual_seed(cfg.seed)
            built.append((cfg, build_model(cfg.model, splits.in_channels, splits.image_size, splits.num_classes).to(device)))

        def fresh():
            out = []
            for cfg, model in built:
                m = copy.deepcopy(model)
                out.append((m, torch.optim.Adam(m.parameters(), lr=cfg.lr), make_loader(data, cfg.batch_size, True, seed=cfg.seed)))
            return out

        def single():
            runs = fresh()

            def work():
                for m, o, loader in runs:
                    bf_training._train_epoch(m, o, loader, device, None)
                _sync(device)
            return work

        def batched():
            rng = training._rng_state()
            kind = _Kind(None, bf_training.EPOCH_RUNNER, bf_training._train_epoch, _PlainBatch)
            batches = [_PlainBatch(g) for g in _groups([_Waiting((m, o, loader, device, None), rng, kind)
                                                         for m, o, loader in fresh()])]

            def work():
                for b in batches:
                    b.epoch()
                _sync(device)
            return work

        return _timed(single, batched, len(built), -(-n // first.batch_size), repeats, timer, device, MAX_MEMBERS)
    finally:
        training._set_rng_state(state)
        _RESIDENT.clear()


class _Waiting:
    """A member as the coordinator sees it while it waits for an epoch (the probe's members)."""

    def __init__(self, args, rng, kind: _Kind = _BMRS):
        self.request = (args, rng)
        self.kind = kind


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _members_that_fit(model, splits, batch_size: int, device: torch.device, share: int) -> int:
    """How many members half of the device's free memory holds, split between ``share`` tasks:
    each member holds its training set on the device, its parameters 8 times (its own, their
    gradients and Adam's two moments, and the same stacked) and the outputs of its modules at
    ``batch_size`` 3 times (forward, saved for backward, gradients); at most MAX_MEMBERS."""
    free = _free_memory(device)
    if free is None:
        return MAX_MEMBERS
    images, labels = splits.train.images, splits.train.labels
    data = images.nelement() * images.element_size() + labels.nelement() * labels.element_size()
    params = sum(p.nelement() * p.element_size() for p in model.parameters())
    acts = []

    def count(_module, _inputs, out):
        if isinstance(out, torch.Tensor):
            acts.append(out.nelement() * out.element_size())

    hooks = [m.register_forward_hook(count) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model.eval()
            model(images[:batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train()
    per_member = data + 8 * params + 3 * sum(acts)
    return max(1, min(MAX_MEMBERS, int(free / 2 / max(1, share) // per_member)))


def _free_memory(device: torch.device) -> int | None:
    """Free bytes of ``device`` (CUDA: ``mem_get_info``; CPU: the available physical pages)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None
