"""The fused noise op (noise._NoisyProduct): values and gradients equal ``h * draw_theta(...)``
through autograd (the previous path), in float64, for every sharing mode, with masks, near the
truncation bounds and with log_sigma outside its clamp; torch.autograd.gradcheck against finite
differences with the uniforms held fixed; one autograd node per noise layer; the one-pass
backward (batch-norm kernel) against the plain products; graph breaks under torch.compile only
at the draw."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bayesprune import add_noise, kl, noise_layers
from bayesprune.distributions import LogUniform, TruncatedLogNormal, draw_theta, draw_theta_parts
from bayesprune.noise import MultiplicativeNoise, _NoisyProduct, _one_pass_backward, _sigma_and_slope

F64 = torch.float64
# (mu, log_sigma) per structure: inside, near the lower bound a = -20 (its weight matters), near
# and above the upper bound b = 0 (mirrored draws; the last one deep in the tail, where the
# sampler takes its log-space Newton path), tiny sigma, and log_sigma below/above its clamp
# [-20, 5] (no gradient reaches it there)
MU = [-1.0, -19.8, -0.05, 0.6, 1.0, -3.0, -2.0, -8.0]
LOG_SIGMA = [-1.0, -1.5, -0.5, -1.2, -4.0, -9.0, -21.0, 6.0]


def _module(sharing, dim=1):
    n = MultiplicativeNoise(len(MU), dim=dim, sharing=sharing).to(F64)
    with torch.no_grad():
        n.mu.copy_(torch.tensor(MU, dtype=F64))
        n.log_sigma.copy_(torch.tensor(LOG_SIGMA, dtype=F64))
        n.mask[3] = 0
    return n.train()


def _reference(n, h, seed):
    """The previous path: uniforms as the layer draws them, theta by draw_theta, then h * theta."""
    dim = n.dim % h.ndim
    shape = [1] * h.ndim
    shape[dim] = n.num_structures
    if n.sharing == "element":
        u_shape = list(h.shape)
    else:
        u_shape = list(shape)
        if n.sharing == "channel":
            u_shape[0] = h.shape[0]
    mu = n.mu.detach().clone().requires_grad_()
    ls = n.log_sigma.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    u = torch.rand(u_shape, dtype=F64)
    theta = draw_theta(mu.view(shape), ls.clamp(*n.log_sigma_bounds).exp().view(shape), n.mask.view(shape), u, n.a, n.b)
    return h * theta, mu, ls


@pytest.mark.parametrize("sharing", ["channel", "structure", "element"])
@pytest.mark.parametrize("layout", ["conv", "linear", "tokens"])
def test_fused_values_and_gradients_equal_the_unfused_path(sharing, layout):
    g = torch.Generator().manual_seed(3)
    shapes = {"conv": ((6, len(MU), 3, 4), 1), "linear": ((6, len(MU)), -1), "tokens": ((4, 5, len(MU)), -1)}
    h_shape, dim = shapes[layout]
    n = _module(sharing, dim)
    h0 = torch.randn(h_shape, generator=g, dtype=F64)
    up = torch.randn(h_shape, generator=g, dtype=F64)
    h_ref = h0.clone().requires_grad_()
    ref_out, mu, ls = _reference(n, h_ref, seed=11)
    torch.autograd.backward(ref_out, up)
    h = h0.clone().requires_grad_()
    torch.manual_seed(11)
    out = n(h)
    assert out.grad_fn.name() == "_NoisyProductBackward"
    torch.autograd.backward(out, up)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=0)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(n.mu.grad, mu.grad, rtol=1e-10, atol=1e-300)
    torch.testing.assert_close(n.log_sigma.grad, ls.grad, rtol=1e-10, atol=1e-300)
    dim_ = dim % h0.ndim
    masked = out.select(dim_, 3)
    assert torch.equal(masked, torch.zeros_like(masked))  # mask 0 gives exact zeros
    assert n.mu.grad[3] == 0 and n.log_sigma.grad[3] == 0
    assert n.log_sigma.grad[6] == 0 and n.log_sigma.grad[7] == 0  # clamped: no gradient
    assert (n.mu.grad[[0, 1, 2, 5]] != 0).all()


def _fused_of_params(n, u, shape):
    """h * theta through the fused op, theta recomputed from (mu, log_sigma) with u fixed, so that
    finite differences in mu and log_sigma see the draw move."""

    def f(h, mu, log_sigma):
        sigma, slope = _sigma_and_slope(log_sigma, n.log_sigma_bounds, F64)
        theta, dmu, dsigma = draw_theta_parts(mu.detach().view(shape), sigma.view(shape), n.mask.view(shape), u, n.a, n.b)
        return _NoisyProduct.apply(h, mu, log_sigma, theta, dmu, dsigma, slope, list(shape))

    return f


@pytest.mark.parametrize("sharing", ["channel", "structure", "element"])
def test_fused_gradient_passes_gradcheck(sharing):
    """Finite differences of the fused op (u fixed) in h, mu and log_sigma, near both bounds, with
    a masked structure; the clamp's own kinks (log_sigma at exactly -20 or 5) left out."""
    mu = torch.tensor([-1.0, -19.5, -0.2, 0.5, -6.0], dtype=F64, requires_grad=True)
    ls = torch.tensor([-1.0, -1.2, -0.7, -1.0, 0.0], dtype=F64, requires_grad=True)
    n = MultiplicativeNoise(5, dim=1, sharing=sharing).to(F64)
    with torch.no_grad():
        n.mask[2] = 0
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 2, 2, generator=g, dtype=F64, requires_grad=True)
    shape = (1, 5, 1, 1)
    u_shape = {"channel": (3, 5, 1, 1), "structure": (1, 5, 1, 1), "element": (3, 5, 2, 2)}[sharing]
    u = torch.rand(u_shape, generator=g, dtype=F64).clamp(0.02, 0.98)  # no draw on a clip point
    assert torch.autograd.gradcheck(_fused_of_params(n, u, shape), (h, mu, ls), eps=1e-6, atol=1e-7, rtol=1e-5)


def _net(sharing):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(5 * 3 * 3, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    x = torch.randn(4, 2, 8, 8, dtype=F64)
    add_noise(model, x[:2], sharing=sharing)
    with torch.no_grad():
        for n in noise_layers(model):
            n.mu.copy_(torch.linspace(-19.9, 0.4, n.num_structures, dtype=F64))
            n.log_sigma.copy_(torch.linspace(-2.0, 0.5, n.num_structures, dtype=F64))
            n.mask[1] = 0
    return model.train(), x


@pytest.mark.parametrize("sharing", ["channel", "structure"])
def test_joint_draw_through_the_fused_op_gives_the_reference_loss_and_gradients(sharing):
    """A whole training step's loss (outputs + KL) and every parameter's gradient, fused and joint,
    against the same network whose noise layers run the unfused reference on the same uniforms."""
    model, x = _net(sharing)
    ref, _ = _net(sharing)
    layers, rlayers = noise_layers(model), noise_layers(ref)
    rows = x.shape[0] if sharing == "channel" else 1
    torch.manual_seed(5)
    u_all = torch.rand(rows, sum(n.num_structures for n in layers), dtype=F64).split([n.num_structures for n in layers], 1)

    def reference_forward(n, u):
        def fwd(h):
            shape = [1] * h.ndim
            shape[n.dim % h.ndim] = n.num_structures
            ushape = list(shape)
            ushape[0] = rows
            return h * draw_theta(n.mu.view(shape), n.sigma.view(shape), n.mask.view(shape), u.reshape(ushape), n.a, n.b)
        return fwd

    for n, u in zip(rlayers, u_all):
        n.forward = reference_forward(n, u)
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    torch.manual_seed(5)
    loss = (model(x) * w).sum() + kl(model)
    loss.backward()
    rloss = (ref(x) * w).sum() + sum(kl_divergence_mean(n) for n in rlayers) / len(rlayers)
    rloss.backward()
    torch.testing.assert_close(loss, rloss, rtol=1e-12, atol=0)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-300, msg=name)


def kl_divergence_mean(n):
    """A layer's mean KL from the distribution objects (torch.distributions.kl_divergence)."""
    q = TruncatedLogNormal(n.mu, n.sigma, n.a, n.b)
    return torch.distributions.kl_divergence(q, LogUniform(n.a, n.b, batch_shape=q.batch_shape)).mean()


def test_one_backward_node_per_noise_layer_and_nothing_else_from_the_draw():
    """The noisy step's graph holds one _NoisyProductBackward per layer and no autograd node for
    the draw's multiply, split, cat, clamp or exp."""
    model, x = _net("channel")
    out = model(x)
    names = _graph_names(out)
    assert names.count("_NoisyProductBackward") == len(noise_layers(model)) == 2
    assert not any(k in name for name in names for k in ("Split", "Cat", "Clamp", "Exp", "ThetaDraw"))
    assert math.isfinite(float(out.detach().sum()))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("h_shape,theta_shape", [
    ((6, 8, 3, 4), (6, 8, 1, 1)),  # one draw per (example, channel) of a conv output
    ((6, 8, 3, 4), (1, 8, 1, 1)),  # one per channel for the batch
    ((6, 8), (1, 8)),  # a Linear's output, per structure
    ((1, 8, 5), (1, 8, 1)),  # a batch of one
])
def test_one_pass_backward_equals_the_products_and_their_sums(dtype, h_shape, theta_shape):
    """The batch-norm-kernel backward returns grad * theta exactly and sum(grad * h) per draw to
    rounding, against the plain products; and only the products it asked for."""
    g = torch.Generator().manual_seed(1)
    h, grad = torch.randn(h_shape, generator=g, dtype=dtype), torch.randn(h_shape, generator=g, dtype=dtype)
    theta = torch.rand(theta_shape, generator=g, dtype=dtype) + 0.1
    theta.view(-1)[2] = 0  # a masked structure
    grad_h, gh = _one_pass_backward(grad, h, theta, True, True)
    assert torch.equal(grad_h, grad * theta)
    reference = (grad.double() * h.double()).sum_to_size(theta_shape)
    tol = 1e-5 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(gh.double(), reference, rtol=tol, atol=tol * float(reference.abs().max()))
    assert gh.shape == theta.shape and gh.dtype == dtype
    only_h, none = _one_pass_backward(grad, h, theta, True, False)
    assert none is None and torch.equal(only_h, grad_h)


def test_one_pass_backward_leaves_other_layouts_to_the_products():
    """Per element, channels-last, tokens with the structure last, a half-precision input and a
    Linear drawn per (example, structure) (nothing to reduce) take the plain products."""
    h = torch.randn(4, 8, 3, 3)
    theta = torch.rand(4, 8, 1, 1)
    assert _one_pass_backward(h, h, theta, True, True) is not None
    assert _one_pass_backward(h, h, torch.rand(4, 8, 3, 3), True, True) is None  # element
    cl = h.contiguous(memory_format=torch.channels_last)
    assert _one_pass_backward(cl, cl, theta, True, True) is None
    tokens = torch.randn(4, 5, 8)
    assert _one_pass_backward(tokens, tokens, torch.rand(4, 1, 8), True, True) is None
    half = h.half()
    assert _one_pass_backward(half, half, theta, True, True) is None
    lin = torch.randn(4, 8)
    assert _one_pass_backward(lin, lin, torch.rand(4, 8), True, True) is None


def test_fused_gradients_agree_between_the_one_pass_and_the_product_paths():
    """A conv network's noisy gradients in float32: channels-last (the products) against
    contiguous (the one-pass kernel), the same draws."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    x = torch.randn(5, 3, 8, 8)
    add_noise(model, x[:2], layers=["0", "2"], placement="layer")
    model.train()
    grads, fmt = {}, torch.channels_last
    for f in (torch.contiguous_format, fmt):
        model.zero_grad(set_to_none=True)
        m = model.to(memory_format=f)
        torch.manual_seed(3)
        m(x.contiguous(memory_format=f)).square().sum().backward()
        grads[f] = {k: p.grad.clone() for k, p in m.named_parameters()}
    for k, g in grads[torch.contiguous_format].items():
        torch.testing.assert_close(grads[fmt][k], g, rtol=1e-4, atol=1e-5, msg=k)


def test_noisy_model_traces_for_torch_compile_with_breaks_only_at_the_draw():
    """torch._dynamo traces the fused product (the custom autograd.Function) into the graph; the
    only graph breaks are at the draw, which runs eagerly (torch.compiler.disable)."""
    model, x = _net("channel")
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count >= 1
    assert all("MultiplicativeNoise._draw" in b.reason for b in explained.break_reasons)
    traced = "\n".join(str(gm.graph) for gm in explained.graphs)
    assert "_NoisyProduct" in traced or "autograd_function_apply" in traced


def _bn_net(sharing, affine=True, momentum=0.1, dims=2):
    """Noise after two BatchNorms (conv-BN-ReLU-conv-BN, or Linear-BN1d): the second BN is a
    noise target."""
    torch.manual_seed(0)
    if dims == 2:
        model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, affine=affine, momentum=momentum), nn.Conv2d(6, 5, 3),
                              nn.BatchNorm2d(5, affine=affine, momentum=momentum), nn.Flatten(), nn.Linear(5 * 4 * 4, 3))
        x = torch.randn(4, 3, 8, 8, dtype=F64)
    else:
        model = nn.Sequential(nn.Linear(7, 6), nn.BatchNorm1d(6, affine=affine, momentum=momentum), nn.Linear(6, 5),
                              nn.BatchNorm1d(5, affine=affine, momentum=momentum), nn.Linear(5, 3))
        x = torch.randn(9, 7, dtype=F64)
    model = model.double()
    add_noise(model, x[:2], sharing=sharing)
    with torch.no_grad():
        for n in noise_layers(model):
            n.mu.copy_(torch.linspace(-19.9, 0.4, n.num_structures, dtype=F64))
            n.log_sigma.copy_(torch.linspace(-2.0, 0.5, n.num_structures, dtype=F64))
            n.mask[1] = 0
        for bn in (model[1], model[3]):
            if affine:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-1, 1)
    return model.train(), x


def _graph_names(out):
    seen, stack, names = set(), [out.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(fn.name())
        stack.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("sharing", ["channel", "structure"])
@pytest.mark.parametrize("affine,momentum,dims", [(True, 0.1, 2), (False, None, 2), (True, 0.1, 1)])
def test_noise_after_batch_norm_fused_equals_batch_norm_then_noise(monkeypatch, sharing, affine, momentum, dims):
    """The fused BatchNorm-and-noise node: outputs, every gradient (input-side weights, BN's
    gamma and beta, mu, log_sigma) and the running statistics equal the BatchNorm followed by the
    noise product on the same draws (float64; masked structure, bounds near both ends)."""
    model, x = _bn_net(sharing, affine, momentum, dims)
    ref, _ = _bn_net(sharing, affine, momentum, dims)
    assert [n.target_name for n in noise_layers(model)] == ["1", "3"]
    w = torch.randn(x.shape[0], 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    xr = x.clone().requires_grad_()
    x = x.clone().requires_grad_()
    torch.manual_seed(5)
    out = model(x)
    names = _graph_names(out)
    assert names.count("_NoisyBatchNormBackward") == 2 and "NativeBatchNormBackward0" not in names
    ((out * w).sum() + kl(model)).backward()
    import bayesprune.noise as noise_module

    monkeypatch.setattr(noise_module, "_noisy_batch_norm", lambda *args: None)
    torch.manual_seed(5)
    rout = ref(xr)
    assert _graph_names(rout).count("NativeBatchNormBackward0") == 2
    ((rout * w).sum() + kl(ref)).backward()
    torch.testing.assert_close(out, rout, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        scale = float(q.grad.abs().max())
        # a bias before a BatchNorm has gradient 0 up to rounding on both paths
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12 * max(scale, 1.0), msg=name)
    for (name, b), (_, c) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, c, rtol=0, atol=0, msg=name)


def test_fused_batch_norm_leaves_other_cases_to_the_product():
    """Eval mode, no gradient and a BatchNorm in eval mode inside a training noise layer take the
    usual path (no _NoisyBatchNormBackward), with BatchNorm's own node."""
    model, x = _bn_net("channel")
    with torch.no_grad():
        assert model(x).grad_fn is None
    model.eval()
    assert "_NoisyBatchNormBackward" not in _graph_names(model(x))
    model.train()
    model[3].eval()  # running statistics, not the batch's
    names = _graph_names(model(x))
    assert names.count("_NoisyBatchNormBackward") == 1 and names.count("NativeBatchNormBackward0") == 1


@pytest.mark.parametrize("sharing", ["channel", "structure"])
def test_fused_batch_norm_in_channels_last_equals_batch_norm_then_noise(monkeypatch, sharing):
    """The fused node on channels-last tensors (its per-example sums) against BatchNorm then the
    product, float64, same draws; its input gradient keeps the channels-last layout."""
    cl = torch.channels_last
    model, x = _bn_net(sharing)
    ref, _ = _bn_net(sharing)
    model, ref = model.to(memory_format=cl), ref.to(memory_format=cl)
    x = x.contiguous(memory_format=cl).requires_grad_()
    xr = x.detach().clone(memory_format=cl).requires_grad_()
    w = torch.randn(x.shape[0], 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    torch.manual_seed(5)
    out = model(x)
    assert _graph_names(out).count("_NoisyBatchNormBackward") == 2
    ((out * w).sum() + kl(model)).backward()
    import bayesprune.noise as noise_module

    monkeypatch.setattr(noise_module, "_noisy_batch_norm", lambda *args: None)
    torch.manual_seed(5)
    rout = ref(xr)
    ((rout * w).sum() + kl(ref)).backward()
    torch.testing.assert_close(out, rout, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        scale = float(q.grad.abs().max())
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12 * max(scale, 1.0), msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_fast_inverse_normal_cdf_equals_ndtri_in_both_branches(dtype):
    """sqrt(2) erfinv(2p - 1) above p = 0.01, ndtri below (a few tails by index, mostly tails
    wholly), and the autograd version: values within a few ulp of float64 ndtri on both sides of
    the switch, near 0 and 1; gradients equal ndtri's (float64)."""
    from torch.special import ndtri

    from bayesprune.distributions import _NDTRI_TAIL, _fast_ndtri

    eps = torch.finfo(dtype).eps
    edge = torch.tensor([_NDTRI_TAIL], dtype=dtype)
    near = torch.cat([edge * (1 - k * eps) for k in (4, 1)] + [edge, edge * (1 + eps), edge * (1 + 4 * eps)])
    g = torch.Generator().manual_seed(5)
    few_tails = torch.cat([torch.rand(2000, generator=g, dtype=dtype) * 0.98 + 0.01, near,
                           torch.tensor([1e-30, 1e-6, 0.5, 1 - 1e-6 if dtype == F64 else 1 - 4 * eps], dtype=dtype)])
    mostly_tails = torch.cat([torch.rand(300, generator=g, dtype=dtype) * _NDTRI_TAIL, few_tails[:50]])
    for p in (few_tails, mostly_tails):
        want = ndtri(p.double())
        got = _fast_ndtri(p.clone())
        assert got.dtype == dtype
        # p itself is exact; erfinv's argument 2p - 1 rounds by at most eps/4 (p < 1/4), which moves z
        # by eps / (4 phi(z)), 1.0e-14 relative at p = 0.01 in float64
        tol = 8 * eps * (1 + want.abs())
        assert ((got.double() - want).abs() <= tol).all()
    p = few_tails.double().requires_grad_()
    z = _fast_ndtri(p)
    (gz,) = torch.autograd.grad(z.sum(), p)
    q = few_tails.double().requires_grad_()
    (gq,) = torch.autograd.grad(ndtri(q).sum(), q)
    torch.testing.assert_close(z.detach(), ndtri(few_tails.double()), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(gz, gq, rtol=1e-9, atol=0)


def test_draw_coefficients_equal_autograd_without_mirroring_and_zero_where_clipped():
    """draw_theta_parts' coefficients in the branches the training regime takes: no structure
    mirrored (F = u), no draw clipped (the aminmax test) or one clipped draw at b (x = b: zero
    coefficients there), against autograd through the explicit sampler (float64)."""
    from bayesprune.distributions import _sample_standardised, sample_log_theta

    mu0 = torch.tensor([0.0, -0.01, 0.02, -5.0], dtype=F64)
    s0 = torch.tensor([0.0067, 0.007, 0.006, 1.0], dtype=F64)
    g = torch.Generator().manual_seed(8)
    u = torch.rand(256, 4, generator=g, dtype=F64)
    w = torch.randn(256, 4, generator=g, dtype=F64)
    for clipped in (False, True):
        uu, ww = u.clone(), w.clone()
        if clipped:
            uu[0, 0] = 1.0  # the u = 1 quantile of column 0: z = h = beta = 0, x = b
            ww[0, 0] = 0.0  # autograd's clamp passes a gradient at the bound; compare the rest
        x, _ = _sample_standardised(mu0, s0, uu, -20.0, 0.0)
        assert bool((x == 0.0).any()) == clipped
        theta, dmu, dsigma = draw_theta_parts(mu0, s0, torch.ones(4, dtype=F64), uu, -20.0, 0.0)
        m, s = mu0.clone().requires_grad_(), s0.clone().requires_grad_()
        want_mu, want_s = torch.autograd.grad((ww * sample_log_theta(m, s, uu, -20.0, 0.0)).sum(), [m, s])
        torch.testing.assert_close((ww * dmu).sum(0), want_mu, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close((ww * dsigma).sum(0), want_s, rtol=1e-7, atol=1e-10)
        if clipped:
            assert dmu[0, 0] == 0 and dsigma[0, 0] == 0
        torch.testing.assert_close(theta, torch.exp(x))
