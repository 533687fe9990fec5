"""Multiplicative noise on structures, for any PyTorch model (docs/maths.md section 1).

Each prunable layer (Linear, Conv1d/2d/3d) gets a :class:`MultiplicativeNoise` with one noise
variable theta_i per output structure (neuron, channel, feature): ``h_i = theta_i * f_i(x)``.
The module is stored as the child ``layer.bayes_noise`` and applied by a forward hook on its
*target*: the layer itself, its BatchNorm, or its activation.

Default placement (``placement="auto"``), following the layer's output through module calls:
layer -> BatchNorm (if its only consumer) -> activation module (if its only consumer and called
once per forward; after a BatchNorm, not an activation that maps 0 to 0 without being positively
homogeneous, such as Hardswish, SiLU, GELU or Tanh: the noise stays before it, where E[theta]
folds exactly into the BatchNorm).  Noise goes after the last module of that chain.  So an MLP or LeNet5 gets
noise after its activations, a conv-BN-ReLU net after the ReLU, and a torchvision ResNet (whose
ReLU module is shared) after every BatchNorm, as docs/maths.md section 4 prescribes.

Noise is drawn per (example, channel) by default (:data:`DEFAULT_SHARING`, ``sharing="channel"``,
Neklyudov et al.); per activation element (``"element"``, the BMRS reference code's draw, about
3x slower to train a LeNet5) and per channel for the whole batch (``"structure"``) are options.

With one draw per (example, channel) (``sharing="channel"``) or per channel for the whole batch
(``sharing="structure"``) of a convolution, the noise moves on
past a pooling module that directly follows (max/average, adaptive or not): pooling commutes with
a positive per-channel scale, ``pool(h * theta) = pool(h) * theta``, so the network computes the
same function (max-pool ties aside) while the noise touches a quarter of the elements or fewer.  With
``placement="layer"`` noise follows the layer directly.  The chain is read from a forward pass
on ``example_inputs`` (required); a chosen layer that this pass does not run follows its
siblings in ``nn.Sequential``.

``add_noise`` keeps ``example_inputs`` with the noise layers (:func:`stored_example_inputs`):
``prune``, ``report``, ``shrink``, ``remaining_parameters`` and ``size_speed_report`` use it when
they are given no input.  Noise parameters take the dtype and device of their layer.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import nn
from torch.distributions import kl_divergence

from .selection import PRUNABLE_TYPES, num_structures as _num_structures, select_noise_layers
from .selection import trace as _trace_model
from .distributions import DEFAULT_A, DEFAULT_B, LogUniform, TruncatedLogNormal, draw_theta_parts, kl_log_uniform

__all__ = [
    "MultiplicativeNoise",
    "add_noise",
    "noise_layers",
    "kl",
    "remove_noise",
    "PRUNABLE_TYPES",
    "DEFAULT_SHARING",
    "SHARING",
    "stored_example_inputs",
]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ACTIVATION_TYPES = (
    nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.PReLU,
)
#: pooling that commutes with a positive per-(example, channel) scale
_POOL_TYPES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
SHARING = ("element", "channel", "structure")
#: the one default noise draw (add_noise, MultiplicativeNoise, the CLI, reproduce, RunConfig)
DEFAULT_SHARING = "channel"
#: dtypes whose draws are computed in float32 (the sampler's special functions need the range)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _stages(layer: nn.Module, sharing: str) -> tuple:
    """The module kinds the noise may move past, in order (see the module docstring)."""
    stages = (_BN_TYPES, _ACTIVATION_TYPES)
    if sharing in ("channel", "structure") and isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        stages += (_POOL_TYPES,)
    return stages


def _is_stage(module: nn.Module, kinds) -> bool:
    return isinstance(module, kinds) and not getattr(module, "return_indices", False)


KL_WEIGHTINGS = ("mean", "elbo", "sum")
#: the reference implementation's weighting, the default of kl() and of the experiments
DEFAULT_KL_WEIGHTING = KL_WEIGHTINGS[0]


class MultiplicativeNoise(nn.Module):
    """theta ~ TruncatedLogNormal(mu, sigma) per structure, multiplying its output along ``dim``.

    Training: ``h * theta * mask`` with theta drawn by reparameterisation, one draw per
    activation element (``sharing="element"``, the BMRS reference), per (example, structure)
    (``sharing="channel"``, Neklyudov et al.) or per structure, one draw shared by the whole
    batch (``sharing="structure"``: the cheapest, with the noisiest gradients).  Eval:
    ``h * E[theta] * mask``.
    Parameters ``mu`` (init 0) and ``log_sigma`` (init -5, clamped to [-20, 5] when used).
    """

    def __init__(
        self,
        num_structures: int,
        dim: int = 1,
        a: float = DEFAULT_A,
        b: float = DEFAULT_B,
        mu_init: float = 0.0,
        log_sigma_init: float = -5.0,
        log_sigma_bounds: tuple[float, float] = (-20.0, 5.0),
        sharing: str = DEFAULT_SHARING,
    ):
        super().__init__()
        if not a < b:
            raise ValueError(f"noise bounds need a < b, got a={a}, b={b}")
        if sharing not in SHARING:
            raise ValueError(f"unknown sharing {sharing!r}; valid: {', '.join(SHARING)}")
        if num_structures < 1:
            raise ValueError(f"num_structures must be >= 1, got {num_structures}")
        self.num_structures, self.dim, self.a, self.b = int(num_structures), int(dim), float(a), float(b)
        # structures when the noise was added; kl(..., "mean") divides by it, so removing masked
        # structures (shrink_for_training) leaves the weight of the kept ones' KL unchanged
        self.initial_structures = int(num_structures)
        self.log_sigma_bounds = tuple(float(v) for v in log_sigma_bounds)
        self.sharing = sharing
        self.mu_init, self.log_sigma_init = float(mu_init), float(log_sigma_init)
        self.mu = nn.Parameter(torch.full((num_structures,), self.mu_init))
        self.log_sigma = nn.Parameter(torch.full((num_structures,), self.log_sigma_init))
        self.register_buffer("mask", torch.ones(num_structures))
        self.layer_name = ""
        self.target_name = ""
        self.chain: list[str] = []  # layer [-> BatchNorm] [-> activation]; noise follows the last
        self.order = 0
        self.example_inputs = None  # set by add_noise; see stored_example_inputs

    def extra_repr(self) -> str:
        return f"{self.num_structures}, dim={self.dim}, a={self.a}, b={self.b}, sharing={self.sharing!r}, layer={self.layer_name!r}"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mu, log_sigma back to their initial values and every mask entry to 1 (e.g. after
        ``model.to_empty(device=...)`` of a model built on the meta device)."""
        self.mu.fill_(self.mu_init)
        self.log_sigma.fill_(self.log_sigma_init)
        self.mask.fill_(1)

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.clamp(*self.log_sigma_bounds).exp()

    def check_finite(self) -> None:
        if self.mu.is_meta:  # no values to check
            return
        with torch.no_grad():  # one reduction and one host read; the counting only on failure
            if bool(torch.isfinite(self.mu.sum() + self.log_sigma.sum())):
                return
        for name in ("mu", "log_sigma"):
            p = getattr(self, name)
            if not bool(torch.isfinite(p).all()):
                bad = int((~torch.isfinite(p)).sum())
                raise FloatingPointError(
                    f"noise layer for {self.layer_name or '<unnamed>'!r}: {bad} non-finite value(s) in {name}; "
                    "training diverged (lower the learning rate or resume from the last good checkpoint)"
                )

    def posterior(self) -> TruncatedLogNormal:
        return TruncatedLogNormal(self.mu, self.sigma, self.a, self.b)

    def prior(self) -> LogUniform:
        return LogUniform(self.a, self.b, batch_shape=self.mu.shape)

    def expected_theta(self) -> torch.Tensor:
        """E[theta] per structure (without the mask)."""
        return self.posterior().mean

    def kl(self) -> torch.Tensor:
        """KL(q || p) per structure."""
        return kl_divergence(self.posterior(), self.prior())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.ndim < 1:
            raise ValueError(f"noise layer for {self.layer_name!r} got a scalar; it needs a tensor with a structure dimension")
        dim = self.dim % h.ndim
        if h.shape[dim] != self.num_structures:
            raise ValueError(
                f"noise layer for {self.layer_name!r} expects {self.num_structures} structures along dim {self.dim}, "
                f"got input of shape {tuple(h.shape)}"
            )
        shape = [1] * h.ndim
        shape[dim] = self.num_structures
        if not self.training:
            self._check_finite_unless_cuda_training(h)
            return h * (self.expected_theta() * self.mask).to(h.dtype).view(shape)
        call = getattr(self, "_batch_norm_call", None)
        if call is not None and call[2] is h:
            fused = _noisy_batch_norm(self, *call)
            if fused is not None:
                return fused
        parts, u_shape = self._draw(h, shape)
        return _noisy_product(h, self, parts, u_shape)

    @torch.compiler.disable
    def _draw(self, h: torch.Tensor, shape: list) -> tuple:
        """``(theta, dx/dmu, dx/dsigma, dsigma/dlog_sigma)`` for ``h`` (this layer's slice of the
        joint draw, or its own draw) and the shape of one draw per entry.  Run eagerly under
        ``torch.compile`` (data-dependent branches); the product and its backward are compiled."""
        dim = self.dim % h.ndim
        if self.sharing == "element":
            u_shape = list(h.shape)
        else:
            u_shape = [1] * h.ndim
            u_shape[dim] = self.num_structures
            if dim != 0:
                if self.sharing == "channel":
                    u_shape[0] = h.shape[0]
                parts = _JointDraw.take(self, u_shape[0], h.device)
                if parts is not None:
                    return parts, u_shape
        self._check_finite_unless_cuda_training(h)
        dtype = _draw_dtype(self.mu.dtype)
        grad = torch.is_grad_enabled() and (self.mu.requires_grad or self.log_sigma.requires_grad)
        with torch.no_grad():
            sigma, dsigma_dlog = _sigma_and_slope(self.log_sigma, self.log_sigma_bounds, dtype)
            u = torch.rand(u_shape, dtype=dtype, device=h.device)
            theta, dmu, dsigma = draw_theta_parts(self.mu.view(shape).to(dtype), sigma.view(shape),
                                                  self.mask.view(shape).to(dtype), u, self.a, self.b,
                                                  coefficients=grad)
        return (theta, dmu, dsigma, dsigma_dlog), u_shape

    def _check_finite_unless_cuda_training(self, h: torch.Tensor) -> None:
        # on CUDA the check would stall the GPU pipeline at every training step; there the
        # training loop's finite-loss check (and prune, kl, eval) catch non-finite parameters
        if not (self.training and h.is_cuda):
            self.check_finite()

    def _hook(self, module, args, output):
        if (isinstance(module, _BN_TYPES) and self.training and self.sharing != "element"
                and not torch.compiler.is_compiling()):
            # forward may fuse with the BatchNorm (see _noisy_batch_norm) when it gets this output
            self._batch_norm_call = (module, args, output)
            try:
                return self(output)
            finally:
                self._batch_norm_call = None
        return self(output)


def _draw_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half and bfloat16 parameters (their draws and gradients pass through the cast)."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


_DRAWS = threading.local()  # per thread: the stack of forward passes with a joint draw


class _JointDraw:
    """One draw of theta for all noise layers of a model that draw per (example, channel) or per
    structure, per forward pass.

    ``add_noise`` registers :meth:`begin`/:meth:`end` as forward pre-/post-hooks of the model.
    The first noise layer that runs in a training forward draws theta for every layer of the
    group (same sharing, bounds, device and dtype) in one call on a ``[batch, total structures]``
    tensor (``[1, total structures]`` for ``sharing="structure"``),
    and each layer takes its slice: the same distribution as one draw per layer, with one set of
    sampler ops per step instead of one per layer.  A layer called twice in one forward, a batch
    size that differs from the first layer's, or a layer run outside the model's forward draws
    on its own.
    """

    def __init__(self, root: nn.Module):
        self.root = root

    def begin(self, module, args) -> None:
        if not hasattr(_DRAWS, "stack"):
            _DRAWS.stack = []
        _DRAWS.stack.append(_Draws(self.root))

    def end(self, module, args, output) -> None:
        stack = getattr(_DRAWS, "stack", None)
        if stack:
            stack.pop()

    @staticmethod
    def take(layer: "MultiplicativeNoise", batch: int, device) -> torch.Tensor | None:
        """This layer's ``[batch, structures]`` slice of the current joint draw, or None."""
        for draws in reversed(getattr(_DRAWS, "stack", ())):
            if draws.holds(layer):
                return draws.take(layer, batch, device)
        return None


class _Draws:
    """The joint draw of one forward pass (made lazily, on the first noise layer's call)."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.index: dict[int, int] | None = None
        self.pieces = None
        self.used: set[int] = set()

    def holds(self, layer) -> bool:
        if self.index is None:
            group = [m for m in noise_layers(self.root) if m.sharing != "element" and m.training]
            key = lambda m: (m.sharing, m.a, m.b, m.log_sigma_bounds, m.mu.device, m.mu.dtype)  # noqa: E731
            self.layers = [m for m in group if key(m) == key(group[0])] if group else []
            self.index = {id(m): i for i, m in enumerate(self.layers)}
        return id(layer) in self.index

    def take(self, layer, batch: int, device) -> torch.Tensor | None:
        if id(layer) in self.used:
            return None
        if self.pieces is None:
            self.key = (batch, device)
            self.pieces = self._draw(batch, device) if device == self.layers[0].mu.device else ()
        if not self.pieces or (batch, device) != self.key:
            return None
        self.used.add(id(layer))
        return self.pieces[self.index[id(layer)]]

    def _draw(self, batch: int, device) -> tuple:
        """Per layer ``(theta, dx/dmu or None, dx/dsigma, dsigma/dlog_sigma)`` (no autograd)."""
        layers, first = self.layers, self.layers[0]
        grad = torch.is_grad_enabled()
        with torch.no_grad():
            both = torch.cat([m.mu for m in layers] + [m.log_sigma for m in layers])  # one cat, one check
            mu, log_sigma = both.split(both.numel() // 2)
            if not (first.training and device.type == "cuda"):  # as MultiplicativeNoise.forward
                if not math.isfinite(float(both.sum())):
                    for m in layers:
                        m.check_finite()  # names the layer
            dtype = _draw_dtype(mu.dtype)
            sigma, slope = _sigma_and_slope(log_sigma, first.log_sigma_bounds, dtype)
            mask = torch.cat([m.mask for m in layers]).to(dtype)
            u = torch.rand((batch, mu.numel()), dtype=dtype, device=device)
            theta, dmu, dsigma = draw_theta_parts(mu.to(dtype), sigma, mask, u, first.a, first.b,
                                                  coefficients=grad)
        sizes = [m.num_structures for m in layers]
        nones = [None] * len(layers)
        return tuple(zip(theta.split(sizes, dim=1), nones if dmu is None else dmu.split(sizes, dim=1),
                         nones if dsigma is None else dsigma.split(sizes, dim=1), slope.split(sizes)))


def _sigma_and_slope(log_sigma: torch.Tensor, bounds: tuple, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``sigma = exp(clamp(log_sigma, *bounds))`` and ``dsigma/dlog_sigma`` (sigma inside the
    clamp's closed interval, 0 outside, as autograd's clamp), in ``dtype``; no autograd."""
    ls = log_sigma.detach().to(dtype)
    clamped = ls.clamp(*bounds)
    sigma = clamped.exp()
    return sigma, torch.where(clamped == ls, sigma, 0.0)  # clamped == ls: inside (NaN: outside)


class _NoisyProduct(torch.autograd.Function):
    """``h * theta`` of a noise layer, with theta's reparameterisation gradient, in one node.

    Inputs: ``h``, the layer's ``mu`` and ``log_sigma`` (for their gradients only), and its draw
    from :func:`~bayesprune.distributions.draw_theta_parts`: ``theta`` (masked, shaped to
    broadcast on h), ``dx/dmu`` (None = 1), ``dx/dsigma`` and ``dsigma/dlog_sigma``.  Backward
    (docs/maths.md section 1): ``dL/dh = grad * theta``; ``g = dL/dx = theta * sum(grad * h)``
    over the elements sharing a draw; ``dL/dmu = sum g dx/dmu``, ``dL/dlog_sigma = (sum g
    dx/dsigma) dsigma/dlog_sigma`` over a structure's draws.  The same values and gradients as
    ``h * draw_theta(...)`` through autograd, without its multiply, split, cat, clamp and exp nodes.
    """

    @staticmethod
    def forward(ctx, h, mu, log_sigma, theta, dmu, dsigma, slope, shape):
        ctx.save_for_backward(h, theta, dmu, dsigma, slope)
        ctx.shape, ctx.dtype = shape, mu.dtype
        return h * theta.to(h.dtype)

    @staticmethod
    def backward(ctx, grad):
        h, theta, dmu, dsigma, slope = ctx.saved_tensors
        need_h, need_mu, need_ls = ctx.needs_input_grad[:3]
        need_theta = need_mu or need_ls
        grad_h = grad_mu = grad_ls = None
        one_pass = _one_pass_backward(grad, h, theta, need_h, need_theta)
        if one_pass is not None:
            grad_h, gh = one_pass
        elif need_h:
            grad_h = grad * theta.to(grad.dtype)
        if need_theta:
            if one_pass is None:
                gh = (grad * h).sum_to_size(theta.shape).to(theta.dtype)
            g = gh.mul_(theta)  # dL/dx per draw
            if need_mu:
                grad_mu = (g if dmu is None else g * dmu).sum_to_size(ctx.shape).reshape(-1).to(ctx.dtype)
            if need_ls:
                grad_ls = ((g * dsigma).sum_to_size(ctx.shape).reshape(-1) * slope).to(ctx.dtype)
        return grad_h, grad_mu, grad_ls, None, None, None, None, None


def _one_pass_backward(grad, h, theta, need_h: bool, need_theta: bool):
    """``(grad * theta, sum of grad * h per draw)`` in one pass over ``grad`` and ``h``, or None
    where the layout does not allow it.

    For one draw per (example, channel) or per channel of a contiguous CPU ``[N, C, ...]``
    tensor: ``h`` viewed as ``[1, N C, R]`` (per example) or ``[N, C, R]`` (per channel) is a
    batch of "channels" each scaled by one theta, and ATen's eval-mode batch-norm backward with
    mean 0, variance 1, eps 0 and weight theta returns exactly ``grad * theta`` (its input
    gradient, ``grad * 1/sqrt(1 + 0) * theta``) and ``sum(grad * h)`` per channel (its weight
    gradient), one channel at a time while it is in cache, without the product's temporary.
    """
    if (h.device.type != "cpu" or h.ndim < 2 or grad.dtype != h.dtype or theta.dtype != h.dtype
            or h.dtype not in (torch.float32, torch.float64) or not h.is_contiguous() or not grad.is_contiguous()
            or grad.shape != h.shape or theta.ndim != h.ndim):
        return None
    n, c = h.shape[0], h.shape[1]
    r = h[0, 0].numel()
    if tuple(theta.shape[1:]) != (c,) + (1,) * (h.ndim - 2):
        return None
    if theta.shape[0] == n and n > 1 or n == 1:  # one draw per (example, channel)
        if r == 1:
            return None  # nothing to reduce: the plain products are cheaper
        view = (1, n * c, r)
    elif theta.shape[0] == 1:  # one draw per channel for the batch
        view = (n, c, r)
    else:
        return None
    k = view[1]
    weight = theta.reshape(k)
    zeros, ones = torch.zeros(k, dtype=h.dtype), torch.ones(k, dtype=h.dtype)
    grad_h, gh, _ = torch.ops.aten.native_batch_norm_backward(
        grad.view(view), h.view(view), weight, zeros, ones, None, None, False, 0.0, [need_h, need_theta, False])
    return (grad_h.view(h.shape) if need_h else None), (gh.view(theta.shape) if need_theta else None)


class _NoisyBatchNorm(torch.autograd.Function):
    """``BN(x) * theta`` of a noise layer after a training-mode BatchNorm, in one node that
    replaces the BatchNorm's own (docs/maths.md section 1.1; what it saves: docs/speed.md,
    "Training overhead").

    Forward: the BatchNorm's output ``y`` (computed by the module, running statistics updated
    there) is multiplied by theta in place, so no new activation-sized tensor is made and
    neither ``y`` nor a copy is kept.  Backward, from the BatchNorm's input ``x``, its batch mean
    ``m`` and ``invstd`` per channel (``x_hat = (x - m) invstd``, ``M`` elements per channel):
    per draw ``S1 = sum grad`` and ``S2 = sum grad x_hat`` in one pass (ATen's eval-mode
    batch-norm backward on the per-draw view); ``sum grad y = gamma S2 + beta S1`` gives theta's
    gradient as in :class:`_NoisyProduct`; ``dbeta = sum theta S1``, ``dgamma = sum theta S2``
    over a channel's draws; and the batch-norm input gradient with ``grad theta`` in place of
    the output gradient, ``dx = gamma invstd theta grad + P x + Q`` with
    ``P = -gamma invstd^2 dgamma / M``, ``Q = gamma invstd (invstd m dgamma - dbeta) / M``.
    """

    @staticmethod
    def forward(ctx, y, x, weight, bias, mu, log_sigma, mean, invstd, theta, dmu, dsigma, slope, shape):
        y.mul_(theta)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, weight, bias, mean, invstd, theta, dmu, dsigma, slope)
        ctx.shape, ctx.dtype = shape, mu.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, invstd, theta, dmu, dsigma, slope = ctx.saved_tensors
        need_x, need_w, need_b, need_mu, need_ls = ctx.needs_input_grad[1:6]
        n, c = x.shape[0], x.shape[1]
        rows = theta.shape[0]
        nhwc = not x.is_contiguous()  # channels-last (the only other layout let in)
        grad = grad.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        sums = [False, True, True]
        if nhwc and rows > 1:  # per (example, channel): each example's [H*W, C] block, C its channels
            ones = torch.ones(c, dtype=x.dtype, device=x.device)
            xs, gs = x.permute(0, 2, 3, 1).reshape(n, -1, c), grad.permute(0, 2, 3, 1).reshape(n, -1, c)
            parts = [torch.ops.aten.native_batch_norm_backward(gs[i], xs[i], ones, mean, ones, None, None, False, 0.0, sums)
                     for i in range(n)]
            s2, s1 = torch.stack([p[1] for p in parts]), torch.stack([p[2] for p in parts])
        elif nhwc:  # per channel: BatchNorm's own layout
            ones = torch.ones(c, dtype=x.dtype, device=x.device)
            _, s2, s1 = torch.ops.aten.native_batch_norm_backward(grad, x, ones, mean, ones, None, None, False, 0.0, sums)
        else:
            view = (1, n * c, x[0, 0].numel()) if rows > 1 else (n, c, x[0, 0].numel())
            ones = torch.ones(view[1], dtype=x.dtype, device=x.device)
            _, s2, s1 = torch.ops.aten.native_batch_norm_backward(
                grad.view(view), x.view(view), ones, mean.repeat(rows) if rows > 1 else mean, ones,
                None, None, False, 0.0, sums)
        bshape = (1, c) + (1,) * (x.ndim - 2)
        s1, s2 = s1.view(theta.shape), s2.view(theta.shape) * invstd.view(bshape)  # per draw
        gamma = weight.view(bshape) if weight is not None else torch.ones((), dtype=x.dtype, device=x.device)
        beta = bias.view(bshape) if bias is not None else torch.zeros((), dtype=x.dtype, device=x.device)
        grad_x = grad_w = grad_b = grad_mu = grad_ls = None
        if need_mu or need_ls:
            g = (gamma * s2 + beta * s1).mul_(theta)  # dL/dx per draw, x = log theta
            if need_mu:
                grad_mu = (g if dmu is None else g * dmu).sum_to_size(ctx.shape).reshape(-1).to(ctx.dtype)
            if need_ls:
                grad_ls = ((g * dsigma).sum_to_size(ctx.shape).reshape(-1) * slope).to(ctx.dtype)
        dbeta = (theta * s1).sum_to_size(bshape)
        dgamma = (theta * s2).sum_to_size(bshape)
        if need_w and weight is not None:
            grad_w = dgamma.reshape(c)
        if need_b and bias is not None:
            grad_b = dbeta.reshape(c)
        if need_x:
            m = x.numel() // c
            gi = gamma * invstd.view(bshape)
            p = (-gi * invstd.view(bshape) * dgamma / m).reshape(c)
            q = (gi * (invstd.view(bshape) * mean.view(bshape) * dgamma - dbeta) / m).reshape(c)
            zeros = torch.zeros(c, dtype=x.dtype, device=x.device)
            ones = torch.ones(c, dtype=x.dtype, device=x.device)
            grad_x = torch.ops.aten.native_batch_norm(x if nhwc else x.view(n, c, -1), p, q, zeros, ones, False, 0.0, 0.0)[0]
            grad_x = grad_x.view(x.shape).addcmul_(grad, gi * theta)  # + gamma invstd theta grad
        return None, grad_x, grad_w, grad_b, grad_mu, grad_ls, None, None, None, None, None, None, None


def _same_dense_layout(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Both contiguous, or both 4-d channels-last."""
    if x.is_contiguous() and y.is_contiguous():
        return True
    cl = torch.channels_last
    return x.ndim == 4 and x.is_contiguous(memory_format=cl) and y.is_contiguous(memory_format=cl)


def _noisy_batch_norm(layer: "MultiplicativeNoise", bn: nn.Module, args, y: torch.Tensor):
    """``bn``'s output ``y`` times the layer's theta through :class:`_NoisyBatchNorm`, or None
    where it does not apply (then the layer runs as usual): a training-mode CPU BatchNorm whose
    output still carries its own autograd node, float32/64, contiguous or channels-last, one draw per
    (example, channel) or per channel, with a gradient wanted; never under torch.compile."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled() or len(args) != 1:
        return None
    x, node = args[0], y.grad_fn
    if (node is None or type(node).__name__ != "NativeBatchNormBackward0" or not getattr(node, "_saved_training", False)
            or getattr(node, "_saved_result1", None) is None or getattr(node, "_saved_result2", None) is None
            or not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.ndim < 2 or layer.dim % x.ndim != 1
            or x.dtype not in (torch.float32, torch.float64) or y.dtype != x.dtype or layer.mu.dtype != x.dtype
            or not _same_dense_layout(x, y) or x.shape != y.shape
            or x.shape[1] != layer.num_structures or not (layer.mu.requires_grad or layer.log_sigma.requires_grad)):
        return None
    shape = [1] * y.ndim
    shape[1] = layer.num_structures
    parts, u_shape = layer._draw(y, shape)
    theta, dmu, dsigma, slope = parts
    if dsigma is None or theta.dtype != x.dtype:
        return _noisy_product(y, layer, parts, u_shape)
    return _NoisyBatchNorm.apply(y.detach(), x, bn.weight, bn.bias, layer.mu, layer.log_sigma,
                                 node._saved_result1, node._saved_result2, theta.view(u_shape),
                                 None if dmu is None else dmu.view(u_shape), dsigma.view(u_shape), slope, shape)


def _noisy_product(h: torch.Tensor, layer: "MultiplicativeNoise", parts: tuple, u_shape) -> torch.Tensor:
    """``h * theta`` through :class:`_NoisyProduct`; ``parts`` = (theta, dx/dmu, dx/dsigma,
    dsigma/dlog_sigma) with one draw per entry of ``u_shape``."""
    theta, dmu, dsigma, slope = parts
    if dsigma is None:  # drawn without gradient (torch.no_grad)
        return h * theta.view(u_shape).to(h.dtype)
    shape = [1] * h.ndim
    shape[layer.dim % h.ndim] = layer.num_structures
    return _NoisyProduct.apply(h, layer.mu, layer.log_sigma, theta.view(u_shape),
                               None if dmu is None else dmu.view(u_shape), dsigma.view(u_shape), slope, shape)


def _install_joint_draw(model: nn.Module) -> None:
    """(Re)register the model's :class:`_JointDraw` hooks (after removing any old ones)."""
    _remove_joint_draw(model)
    joint = _JointDraw(model)
    model.register_forward_pre_hook(joint.begin)
    model.register_forward_hook(joint.end, always_call=True)


def _remove_joint_draw(model: nn.Module) -> None:
    for m in model.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key, fn in list(hooks.items()):
                if isinstance(getattr(fn, "__self__", None), _JointDraw):
                    del hooks[key]
                    getattr(m, "_forward_hooks_always_called", {}).pop(key, None)


def _chain_from_trace(calls: list, layer_call, placement: str, sharing: str, uses=None) -> list[str]:
    """The layer and the modules its noise moves past; ``uses``: id(tensor) -> operations outside
    modules that also take it (a functional consumer, e.g. an SE gate's ``scale * x``, stops it)."""
    if placement == "layer":
        return [layer_call.name]
    counts: dict[int, int] = {}
    for c in calls:
        counts[id(c.module)] = counts.get(id(c.module), 0) + 1
    n, _ = _num_structures(layer_call.module)
    cur = layer_call
    chain = [cur.name]
    for kinds in _stages(layer_call.module, sharing):
        consumers = [c for c in calls if any(x is cur.output for x in c.inputs)]
        if len(consumers) != 1 or not _is_stage(consumers[0].module, kinds):
            continue
        if (uses or {}).get(id(cur.output), 0):
            break
        nxt = consumers[0]
        if counts[id(nxt.module)] != 1:
            break
        if isinstance(nxt.module, _BN_TYPES) and nxt.module.num_features != n:
            break
        if isinstance(cur.module, _BN_TYPES) and _folds_before(nxt.module):
            break
        cur = nxt
        chain.append(cur.name)
    return chain


def _chain_from_sequential(model: nn.Module, layer_name: str, placement: str, sharing: str) -> list[str]:
    if placement == "layer" or "." not in layer_name and not isinstance(model, nn.Sequential):
        return [layer_name]
    parent_name, _, child = layer_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return [layer_name]
    keys = list(parent._modules.keys())
    idx = keys.index(child)
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):  # an instance registered twice is shared
        uses[id(m)] = uses.get(id(m), 0) + 1
    chain = [layer_name]
    n, _ = _num_structures(parent._modules[child])
    for kinds in _stages(parent._modules[child], sharing):
        if idx + 1 >= len(keys):
            break
        nxt = parent._modules[keys[idx + 1]]
        if not _is_stage(nxt, kinds):
            continue
        if isinstance(nxt, _BN_TYPES) and nxt.num_features != n:
            break
        if uses[id(nxt)] != 1:
            break
        if isinstance(parent._modules[keys[idx]], _BN_TYPES) and _folds_before(nxt):
            break
        idx += 1
        chain.append(f"{parent_name}.{keys[idx]}" if parent_name else keys[idx])
    return chain


#: f(s x) = s f(x) for a per-channel s >= 0 (a scale after them folds into the module before them)
_HOMOGENEOUS_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity)


def _folds_before(act: nn.Module) -> bool:
    """Whether noise after a BatchNorm stays before the activation ``act`` that follows it: ``act``
    is not positively homogeneous (so noise after it could only fold into what reads its output,
    impossible where that is a residual addition) and maps 0 to 0 (Hardswish, SiLU, GELU, Tanh,
    ...: a structure whose theta is 0 before it is still zero after it).  Then
    ``act(BN(x) * s) = act(BN'(x))``, BN' with weight and bias scaled by s: the fold is exact
    (docs/shrink.md, "Fused BatchNorm and activation"; the paper's ResNet placement, after the
    BatchNorm)."""
    if isinstance(act, _HOMOGENEOUS_ACTIVATIONS):
        return False
    p = next(act.parameters(), None)
    zero = torch.zeros(1, device=p.device if p is not None else None, dtype=p.dtype if p is not None else None)
    try:
        with torch.no_grad():
            return bool(act(zero).eq(0).all())
    except Exception:  # an activation that needs another shape: keep the noise after it
        return False


def _before_fused_activation(named: dict, chain: list[str]) -> list[str]:
    """A chain ending at a BatchNorm that applies its own activation, ``act(drop(BN(x)))`` (timm's
    ``BatchNormAct2d``), with an ``act`` the noise stays before (:func:`_folds_before`) ends at its ``drop``
    child instead: the noise then sits between the affine and the activation, where
    ``E[theta] * mask`` folds exactly into the BatchNorm's weight and bias (docs/shrink.md, "Fused
    BatchNorm and activation")."""
    last = named[chain[-1]]
    drop, act = getattr(last, "drop", None), getattr(last, "act", None)
    if (len(chain) > 1 and isinstance(last, _BN_TYPES) and isinstance(drop, nn.Module) and isinstance(act, nn.Module)
            and _folds_before(act)):
        return chain + [f"{chain[-1]}.drop"]
    return chain


def add_noise(
    model: nn.Module,
    example_inputs,
    *,
    layers=None,
    placement: str = "auto",
    exclude_output_layer: bool = True,
    sharing: str = DEFAULT_SHARING,
    **noise_kwargs,
) -> nn.Module:
    """Insert a :class:`MultiplicativeNoise` after every prunable layer of ``model`` (in place).

    ``example_inputs``: a small input batch (a tensor, or a tuple/dict of the forward's
    arguments), required: it shows which layers run and where their outputs go, and is kept
    with the noise layers for ``prune``, ``report``, ``shrink`` and the size reports.
    ``layers``: optional names (or modules) of the layers to make prunable; by default every
    Linear/Conv layer (and Hugging Face Conv1D) that runs in the forward pass except the
    prediction heads, the layers a model output is computed from without another prunable
    layer in between (``exclude_output_layer=False`` includes them), and the layers feeding a
    recurrent module (:func:`bayesprune.selection.select_noise_layers` decides).  ``placement``:
    ``"auto"`` (see module docstring) or ``"layer"``.  ``sharing``: the noise draw, per
    (example, channel) by default (:data:`DEFAULT_SHARING`).  ``noise_kwargs`` go to
    :class:`MultiplicativeNoise` (``a``, ``b``, ``mu_init``, ``log_sigma_init``).
    Noise parameters take the dtype and device of their layer.  Returns the model.
    """
    if example_inputs is None:
        raise ValueError(
            "add_noise needs example_inputs, a small input batch (e.g. x[:2]): it traces where each "
            "layer's output goes and is kept for prune, report and shrink"
        )
    if placement not in ("auto", "layer"):
        raise ValueError(f"unknown placement {placement!r}; valid: auto, layer")
    if sharing not in SHARING:
        raise ValueError(f"unknown sharing {sharing!r}; valid: {', '.join(SHARING)}")
    if noise_layers(model):
        raise ValueError("model already has noise layers; call remove_noise(model) first")
    named = dict(model.named_modules())
    traced = _trace_model(model, example_inputs)
    calls = traced.calls
    chosen = select_noise_layers(model, traced, layers, exclude_output_layer)
    for order, name in enumerate(chosen):
        layer = named[name]
        n, dim = _num_structures(layer)
        if name in [c.name for c in calls]:
            layer_call = next(c for c in calls if c.name == name)
            chain = _chain_from_trace(calls, layer_call, placement, sharing, traced.functional_uses)
        else:
            chain = _chain_from_sequential(model, name, placement, sharing)
        chain = _before_fused_activation(named, chain)
        target_name = chain[-1]
        noise = MultiplicativeNoise(n, dim=dim, sharing=sharing, **noise_kwargs)
        noise.layer_name, noise.target_name, noise.order = name, target_name, order
        noise.chain = chain
        noise.example_inputs = example_inputs
        p = next(layer.parameters())
        noise.to(device=p.device, dtype=p.dtype if p.is_floating_point() else None)
        noise.train(layer.training)  # a model already in eval mode gets its noise in eval mode (E[θ])
        layer.add_module("bayes_noise", noise)
        noise._handle = named[target_name].register_forward_hook(noise._hook)
    _install_joint_draw(model)
    return model


def noise_layers(model: nn.Module) -> list[MultiplicativeNoise]:
    """The model's noise modules, in forward order."""
    found = [m for m in model.modules() if isinstance(m, MultiplicativeNoise)]
    return sorted(found, key=lambda m: m.order)


def meta_error(what: str) -> ValueError:
    """The error for a model on the meta device (shapes without values)."""
    return ValueError(
        f"the model is on the meta device (parameters without values): {what} needs real values. "
        "Sizes work there (count_parameters, noise_layers); to go on, materialise it with "
        "model.to_empty(device=...), then load weights or call reset_parameters() on each noise layer"
    )


def check_not_meta(layers, what: str) -> None:
    """Raise :func:`meta_error` where noise layers are on the meta device."""
    if any(n.mu.is_meta for n in layers):
        raise meta_error(what)


def stored_example_inputs(model: nn.Module):
    """The ``example_inputs`` given to :func:`add_noise` (kept by the noise layers), or None."""
    for m in noise_layers(model):
        if m.example_inputs is not None:
            return m.example_inputs
    return None


def remove_noise(model: nn.Module) -> nn.Module:
    """Detach every noise module and its hook (in place); masks are *not* applied."""
    for name, m in list(model.named_modules()):
        noise = getattr(m, "bayes_noise", None)
        if isinstance(noise, MultiplicativeNoise):
            handle = getattr(noise, "_handle", None)
            if handle is not None:
                handle.remove()
            # a deep copy carries the hook with the copied bound method: drop it by identity
            target = model.get_submodule(noise.target_name)
            for key, fn in list(target._forward_hooks.items()):
                if getattr(fn, "__self__", None) is noise:
                    del target._forward_hooks[key]
            del m._modules["bayes_noise"]
    _remove_joint_draw(model)
    return model


def kl(model: nn.Module, weighting: str = DEFAULT_KL_WEIGHTING, num_train: int | None = None) -> torch.Tensor:
    """KL term of the loss.

    ``"mean"``: the reference's weighting, mean KL of each layer summed and divided by the
    number of layers (no data-set scaling); a layer's mean divides by its number of structures
    when the noise was added (``initial_structures``: masked ones count, removed ones too, so
    training on after :func:`~bayesprune.removal.shrink_for_training` optimises the kept
    structures exactly as the masked network did).  ``"elbo"``: summed KL / ``num_train`` (the ELBO per
    example, matching a batch-mean cross-entropy).  ``"sum"``: the plain summed KL.
    """
    layers = noise_layers(model)
    if not layers:
        raise ValueError("model has no noise layers; call bayesprune.add_noise(model, ...) first")
    check_not_meta(layers, "the KL")
    if weighting not in KL_WEIGHTINGS:
        raise ValueError(f"unknown KL weighting {weighting!r}; valid: {', '.join(KL_WEIGHTINGS)}")
    if weighting == "elbo" and (not num_train or num_train < 1):
        raise ValueError("weighting='elbo' needs num_train, the number of training examples")
    kl_all = _kl_per_structure(layers)
    if weighting == "mean":  # sum over layers of each layer's mean, / number of layers
        return torch.dot(kl_all, _mean_weights(tuple((m.num_structures, m.initial_structures) for m in layers), kl_all.device, kl_all.dtype))
    total = kl_all.sum()
    return total / num_train if weighting == "elbo" else total


def _kl_per_structure(layers: list[MultiplicativeNoise]) -> torch.Tensor:
    """KL(q || p) of every structure, layers concatenated in order: one batched call on all
    structures (a few dozen operations, whatever the number of layers) where the bounds agree."""
    bounds = {(m.a, m.b) for m in layers}
    if len(bounds) != 1:
        return torch.cat([m.kl() for m in layers])
    a, b = bounds.pop()
    mu = torch.cat([m.mu for m in layers])
    if len({m.log_sigma_bounds for m in layers}) == 1:
        sigma = torch.cat([m.log_sigma for m in layers]).clamp(*layers[0].log_sigma_bounds).exp()
    else:
        sigma = torch.cat([m.sigma for m in layers])
    return kl_log_uniform(mu, sigma, a, b).to(mu.dtype)  # = kl_divergence(q, p), without the objects


_MEAN_WEIGHTS: dict = {}


def _mean_weights(sizes: tuple, device, dtype) -> torch.Tensor:
    """1 / (initial n_layer * number of layers) for each of a layer's n structures, cached per
    layout; ``sizes`` holds (n, initial n) per layer."""
    key = (sizes, str(device), dtype)
    if key not in _MEAN_WEIGHTS:
        w = torch.cat([torch.full((n,), 1.0 / (n0 * len(sizes)), dtype=torch.float64) for n, n0 in sizes])
        _MEAN_WEIGHTS[key] = w.to(device=device, dtype=dtype)
    return _MEAN_WEIGHTS[key]
