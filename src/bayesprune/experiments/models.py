"""Plain PyTorch networks used by the experiments (no noise layers).

Noise is added afterwards by ``bayesprune.add_noise``, which places a noise layer after each
Linear/Conv layer's activation module when that module directly consumes the layer output and is
called once per forward pass (or after its BatchNorm).  The networks here are therefore built from
``nn.Sequential`` containers with a *separate* activation module instance for every use.

Networks
--------
* :class:`MLP` -- ``Flatten, [Linear -> act] x (extra_layers + 1), Linear`` (BMRS paper, docs/maths.md section 4).
* :class:`LeNet5` -- ``Conv(c,6c,5) ReLU Pool, Conv(6c,16c,5) ReLU Pool, FC 120c, FC 84c, FC k``.
* :class:`LeNet5Caffe` -- ``Conv(c,20,5) ReLU Pool, Conv(20,50,5) ReLU Pool, FC 500, FC k``, the
  "LeNet5 20-50-800-500" of Structured Bayesian Pruning (431 k parameters on 28x28 MNIST).
* :func:`cifar_resnet18` -- torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool.
* :func:`resnet50`, :func:`vit_b16`, :func:`vit_small` -- the BMRS paper's Table 2 networks
  (torchvision ResNet-50 and ViT-B/16) and a ViT of 2.7 M parameters for CPU budgets; their
  noise placement is :func:`noise_layer_names`, pretrained weights come from a file
  (:func:`load_weights`).
* :func:`torchvision_model` -- any torchvision classification model by name.
* :class:`FCN`, :class:`CNN` -- the networks of the Bayes-factor pruning paper (docs/maths.md section 5).
* :func:`build_model` -- one entry point by name (``MODELS`` plus ``tv:<torchvision name>``).
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = [
    "MLP",
    "LeNet5",
    "LeNet5Caffe",
    "FCN",
    "CNN",
    "cifar_resnet18",
    "torchvision_model",
    "torchvision_model_names",
    "build_model",
    "resnet50",
    "vit_b16",
    "vit_small",
    "load_weights",
    "noise_layer_names",
    "MODELS",
    "TORCHVISION_PREFIX",
]

#: Names accepted by :func:`build_model` (besides ``"tv:<name>"`` for torchvision models).
MODELS: tuple[str, ...] = ("mlp", "lenet5", "lenet5-caffe", "resnet18-cifar", "fcn", "cnn", "resnet50", "vit-b16", "vit-small")
#: models that accept pretrained weights from a file (``weights=PATH``)
WEIGHTS_MODELS: tuple[str, ...] = ("resnet18-cifar", "resnet50", "vit-b16", "vit-small")
#: Prefix selecting a torchvision model in :func:`build_model`, e.g. ``"tv:mobilenet_v3_small"``.
TORCHVISION_PREFIX = "tv:"


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _dense_stack(in_features: int, hidden, num_classes: int, activation) -> list[nn.Module]:
    """``Flatten, [Linear(fan_in, h), activation()] for h in hidden, Linear(hidden[-1], num_classes)``."""
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = in_features
    for h in hidden:
        layers += [nn.Linear(fan_in, h), activation()]
        fan_in = h
    return layers + [nn.Linear(fan_in, num_classes)]


class MLP(nn.Sequential):
    """Multi-layer perceptron ``Flatten, [Linear -> activation] x (extra_layers + 1), Linear``.

    ``extra_layers`` is L in the BMRS paper: the number of hidden layers beyond the first, so the
    network has ``extra_layers + 1`` hidden layers of ``width`` units and ``extra_layers + 2``
    Linear layers in total.  ``activation`` is a module class (or factory) instantiated once per
    hidden layer, so every activation module is used exactly once per forward pass.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        width: int = 100,
        extra_layers: int = 7,
        activation: Callable[[], nn.Module] = nn.Tanh,
    ) -> None:
        _check_positive_int("in_features", in_features)
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("width", width)
        if isinstance(extra_layers, bool) or not isinstance(extra_layers, int) or extra_layers < 0:
            raise ValueError(f"extra_layers must be an integer >= 0, got {extra_layers!r}")
        super().__init__(*_dense_stack(in_features, [width] * (extra_layers + 1), num_classes, activation))
        self.in_features = in_features
        self.num_classes = num_classes
        self.width = width
        self.extra_layers = extra_layers


def _lenet_padding(image_size: int) -> int:
    # Without padding, 5x5 convs need image_size >= 16 (16 -> 12 -> 6 -> 2 -> 1).
    return 2 if image_size < 16 else 0


class LeNet5(nn.Sequential):
    """LeNet-5 as in the BMRS paper, widened by the number of input channels ``c``.

    ``Conv(c,6c,5) ReLU MaxPool2, Conv(6c,16c,5) ReLU MaxPool2, Flatten, Linear(16c*s*s,120c) ReLU,
    Linear(120c,84c) ReLU, Linear(84c,num_classes)``.

    For the standard 32x32 input, ``s = 5`` (32 -> 28 -> 14 -> 10 -> 5).  For other sizes the flatten
    size is computed; for ``image_size < 16`` both convolutions use ``padding=2`` ("same" padding)
    so small inputs such as the 8x8 digits still work (8 -> 8 -> 4 -> 4 -> 2, i.e. ``s = 2``).  The
    attribute ``padding`` records which padding was used.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 32) -> None:
        c = _check_positive_int("in_channels", in_channels)
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("image_size", image_size)
        pad = _lenet_padding(image_size)
        s = image_size
        s = (s + 2 * pad - 4) // 2  # conv 5x5, then max-pool 2
        s = (s + 2 * pad - 4) // 2
        if s < 1:
            raise ValueError(f"image_size={image_size} is too small for LeNet5 (need >= 4)")
        super().__init__(
            nn.Conv2d(c, 6 * c, 5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6 * c, 16 * c, 5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * c * s * s, 120 * c),
            nn.ReLU(),
            nn.Linear(120 * c, 84 * c),
            nn.ReLU(),
            nn.Linear(84 * c, num_classes),
        )
        self.in_channels = c
        self.num_classes = num_classes
        self.image_size = image_size
        self.padding = pad
        self.feature_size = s


class LeNet5Caffe(nn.Sequential):
    """The Caffe LeNet-5 that Structured Bayesian Pruning (Neklyudov et al. 2017) prunes, "LeNet5
    20-50-800-500" (docs/maths.md section 4.3).

    ``Conv(c,20,5) ReLU MaxPool2, Conv(20,50,5) ReLU MaxPool2, Flatten, Linear(50*s*s,500) ReLU,
    Linear(500,num_classes)``; ``s = 4`` on the native 28x28 MNIST (``image_size=28``, 431,080
    parameters), ``s = 5`` on the 32x32 images the BMRS protocol resizes to (646,080).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        c = _check_positive_int("in_channels", in_channels)
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("image_size", image_size)
        s = ((image_size - 4) // 2 - 4) // 2
        if s < 1:
            raise ValueError(f"image_size={image_size} is too small for LeNet5Caffe (need >= 16)")
        super().__init__(
            nn.Conv2d(c, 20, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(50 * s * s, 500),
            nn.ReLU(),
            nn.Linear(500, num_classes),
        )
        self.feature_size = s


class FCN(nn.Sequential):
    """Fully connected network of the Bayes-factor pruning paper: two hidden ReLU layers.

    The paper gives no hidden sizes; we use ``(256, 128)`` by default: a common funnel for
    MNIST-sized inputs that is large enough to over-fit (the paper's curves show over-fitting) and
    small enough to train on a CPU.  Any tuple of hidden sizes is accepted.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (256, 128)) -> None:
        _check_positive_int("in_features", in_features)
        _check_positive_int("num_classes", num_classes)
        hidden = tuple(hidden)
        if not hidden:
            raise ValueError("hidden must name at least one hidden layer size")
        for h in hidden:
            _check_positive_int("hidden size", h)
        super().__init__(*_dense_stack(in_features, hidden, num_classes, nn.ReLU))
        self.in_features = in_features
        self.num_classes = num_classes
        self.hidden = hidden


class CNN(nn.Sequential):
    """CNN of the Bayes-factor pruning paper.

    ``Conv(c,32,3,pad 1) ReLU MaxPool2, Conv(32,64,3,pad 1) ReLU MaxPool2, Flatten,
    Linear(64*(s//4)^2, 128) ReLU, Linear(128, num_classes)`` with ``s = image_size``.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int = 32) -> None:
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("image_size", image_size)
        s = image_size // 2 // 2
        if s < 1:
            raise ValueError(f"image_size={image_size} is too small for CNN (need >= 4)")
        super().__init__(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * s * s, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_size = image_size


def cifar_resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-18 adapted to 32x32 inputs (the usual CIFAR variant).

    The 7x7 stride-2 stem is replaced by a 3x3 stride-1 convolution (no bias, followed by the
    existing BatchNorm) and the stem max-pool is removed, so 32x32 inputs reach the last stage at
    4x4 instead of 1x1.  Note that torchvision's ``BasicBlock`` reuses one ReLU module twice per
    block; noise for ResNets goes after the BatchNorms (docs/maths.md section 4), which are all distinct.
    """
    import torchvision

    _check_positive_int("num_classes", num_classes)
    _check_positive_int("in_channels", in_channels)
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def resnet50(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-50 (the BMRS paper's Table 2), random weights, ``num_classes`` outputs.

    Noise goes after every BatchNorm (torchvision's Bottleneck reuses one ReLU module, so
    ``add_noise``'s default placement stops at the BatchNorm; docs/maths.md section 4.3)."""
    import torchvision

    _check_positive_int("num_classes", num_classes)
    model = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_first_conv(model, _check_positive_int("in_channels", in_channels))
    return model


class SelfAttention(nn.Module):
    """Multi-head self-attention whose output projection runs as a module call,
    ``out_proj(softmax(q k^T / sqrt(d_head)) v)`` (docs/maths.md section 4.3), so that noise can
    follow it; the parameters and state-dict keys of torchvision's ViT attention
    (``nn.MultiheadAttention``: ``in_proj_weight``, ``in_proj_bias``, ``out_proj``), the same output.
    A plain module, not an ``nn.MultiheadAttention``, so that Torch-Pruning sees ``out_proj`` as a
    Linear layer of its own."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not a multiple of num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None, **unused):
        if not (query is key is value) or key_padding_mask is not None or attn_mask is not None:
            raise ValueError("SelfAttention computes plain self-attention only (query is key is value, no masks)")
        b, t, d = query.shape
        h = self.num_heads
        qkv = nn.functional.linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d)), None


def _vision_transformer(num_classes, image_size, in_channels, patch_size, num_layers, num_heads, hidden_dim, mlp_dim):
    from torchvision.models.vision_transformer import VisionTransformer

    _check_positive_int("num_classes", num_classes)
    _check_positive_int("image_size", image_size)
    _check_positive_int("in_channels", in_channels)
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} is not a multiple of the ViT's patch size {patch_size}")
    model = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers, num_heads=num_heads,
                              hidden_dim=hidden_dim, mlp_dim=mlp_dim, num_classes=num_classes)
    if in_channels != 3:
        old = model.conv_proj
        model.conv_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
        del old
    for block in model.encoder.layers:
        old = block.self_attention
        new = SelfAttention(old.embed_dim, old.num_heads, dropout=old.dropout)
        new.load_state_dict(old.state_dict())
        block.self_attention = new
    return model


def vit_b16(num_classes: int = 10, image_size: int = 224, in_channels: int = 3) -> nn.Module:
    """torchvision ViT-B/16 (patch 16, 12 layers, 12 heads, width 768, MLP 3072; Dosovitskiy et
    al. 2021), random weights, with :class:`SelfAttention`; ``image_size`` a multiple of 16."""
    return _vision_transformer(num_classes, image_size, in_channels, 16, 12, 12, 768, 3072)


def vit_small(num_classes: int = 10, image_size: int = 32, in_channels: int = 3) -> nn.Module:
    """A ViT of about 2.7 M parameters for CPU budgets: torchvision's VisionTransformer with
    6 layers, 6 heads, width 192, MLP 768 and patches of ``image_size // 8`` (64 patches)."""
    return _vision_transformer(num_classes, image_size, in_channels, max(1, image_size // 8), 6, 6, 192, 768)


def noise_layer_names(name: str, model: nn.Module) -> list[str] | None:
    """The layers that get noise in the BMRS paper's placement (docs/maths.md section 4.3), for
    ``add_noise(layers=...)``: for the ViTs each block's attention-output and MLP-output dense
    layers (``self_attention.out_proj``, ``mlp.3``); None (``add_noise``'s default: every layer
    but the output layer, after its BatchNorm or activation) for the others."""
    if name not in ("vit-b16", "vit-small"):
        return None
    return [n for n, _ in model.named_modules() if n.endswith(("self_attention.out_proj", "mlp.3"))]


#: classifier layers replaced when a weights file was made for another number of classes
_HEADS = ("fc.", "heads.head.")


def load_weights(model: nn.Module, path) -> nn.Module:
    """Load the state dict in ``path`` into ``model`` (``torch.load(weights_only=True)``: tensors
    only, no code runs).  A dict holding it under ``"state_dict"`` or ``"model"`` is unwrapped,
    and a ``"module."`` prefix (DataParallel) is dropped.  The classifier head (``fc``,
    ``heads.head``) keeps its fresh weights when the file's has another number of classes; any
    other missing, unexpected or misshapen key is a ``ValueError`` naming the file and the keys."""
    from pathlib import Path

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (--weights)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"weights file {path} cannot be read as a state dict with torch.load(weights_only=True) "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} holds no state dict (a dict of parameter name -> tensor)")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    own = model.state_dict()
    head = {k for k in own if k.startswith(_HEADS)}
    misshapen = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if misshapen and set(misshapen) <= head:
        state = {k: v for k, v in state.items() if k not in head}
    problems = []
    missing = sorted(own.keys() - state.keys() - (head if not head & state.keys() else set()))
    unexpected = sorted(state.keys() - own.keys())
    bad = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing:
        problems.append(f"missing {len(missing)} key(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:3])}")
    if bad:
        problems.append("shapes differ: " + ", ".join(f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} "
                                                      "in the model" for k in bad[:3]))
    if problems:
        raise ValueError(f"weights file {path} does not fit {type(model).__name__}: {'; '.join(problems)} "
                         "(a ViT's positional embedding fits only its own --image-size, 224 for ImageNet weights)")
    model.load_state_dict(state, strict=False)
    return model


def torchvision_model_names() -> list[str]:
    """Names of torchvision's image-classification models (``torchvision.models`` namespace)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _replace_head(model: nn.Module, num_classes: int) -> bool:
    """Replace the last classifier layer (Linear, or SqueezeNet's 1x1 Conv) for ``num_classes``."""
    last_name, last = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv2d) and name.startswith("classifier") and module.kernel_size == (1, 1)
        ):
            # Skip auxiliary heads (GoogLeNet/Inception) -- they are not the main output.
            if not name.startswith(("aux", "AuxLogits")):
                last_name, last = name, module
    if last is None:
        return False
    if isinstance(last, nn.Linear):
        if last.out_features == num_classes:
            return True
        new = nn.Linear(last.in_features, num_classes, bias=last.bias is not None)
    else:
        if last.out_channels == num_classes:
            return True
        new = nn.Conv2d(last.in_channels, num_classes, kernel_size=1, bias=last.bias is not None)
    new = new.to(device=last.weight.device, dtype=last.weight.dtype)
    _set_submodule(model, last_name, new)
    for attr in ("num_classes",):
        if hasattr(model, attr):
            setattr(model, attr, num_classes)
    return True


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the first 3-channel Conv2d by one taking ``in_channels``.

    Pretrained weights are carried over by averaging the RGB filters and repeating the average
    (scaled by 3 / in_channels so that activations keep their scale).
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3 and module.groups == 1:
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                kernel_size=module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            ).to(device=module.weight.device, dtype=module.weight.dtype)
            with torch.no_grad():
                mean = module.weight.mean(dim=1, keepdim=True)
                new.weight.copy_(mean.expand_as(new.weight) * (3.0 / in_channels))
                if module.bias is not None:
                    new.bias.copy_(module.bias)
            _set_submodule(model, name, new)
            return
    raise ValueError(
        f"cannot adapt {type(model).__name__} to in_channels={in_channels}: no 3-channel Conv2d "
        "stem found; convert the inputs to 3 channels instead"
    )


def torchvision_model(
    name: str, num_classes: int, in_channels: int = 3, weights: Any = None, **kwargs: Any
) -> nn.Module:
    """Any torchvision classification model by name (``torchvision.models.get_model``).

    Random initialisation by default; pretrained weights only when ``weights`` is given (e.g.
    ``"DEFAULT"`` or a ``Weights`` enum) -- this may download.  With ``weights=None`` the model is
    built directly with ``num_classes`` outputs; with weights the 1000-class head is replaced.  When
    ``in_channels != 3`` the first 3-channel convolution is replaced (pretrained filters averaged
    over RGB).  Extra ``kwargs`` go to ``get_model`` (e.g. ``image_size=32`` for ViTs).
    """
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("in_channels", in_channels)
    import torchvision

    names = torchvision_model_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(
            f"unknown torchvision model {name!r}; {hint}"
            f"available: {', '.join(names)}"
        )
    if weights is None:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    else:
        model = torchvision.models.get_model(name, weights=weights, **kwargs)
        if not _replace_head(model, num_classes):
            raise ValueError(f"cannot find the classifier head of {name!r} to replace")
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def build_model(
    name: str, in_channels: int, image_size: int, num_classes: int, **kwargs: Any
) -> nn.Module:
    """Build a network by name.

    ``name`` is one of :data:`MODELS` (``mlp``, ``lenet5``, ``lenet5-caffe``, ``resnet18-cifar``, ``fcn``, ``cnn``, ...) or
    ``"tv:<torchvision name>"``.  Fully connected networks get
    ``in_features = in_channels * image_size ** 2``.  ``kwargs`` go to the constructor (e.g.
    ``width``/``extra_layers`` for ``mlp``, ``hidden`` for ``fcn``, ``weights`` for ``tv:``).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if isinstance(key, str) and key.startswith(TORCHVISION_PREFIX):
        return torchvision_model(
            name.strip()[len(TORCHVISION_PREFIX):], num_classes, in_channels=in_channels, **kwargs
        )
    in_features = in_channels * image_size * image_size
    if key == "mlp":
        return MLP(in_features, num_classes, **kwargs)
    if key == "lenet5":
        return LeNet5(in_channels, num_classes, image_size=image_size, **kwargs)
    if key == "lenet5-caffe":
        return LeNet5Caffe(in_channels, num_classes, image_size=image_size, **kwargs)
    weights = kwargs.pop("weights", None) if key in WEIGHTS_MODELS else None
    if key in WEIGHTS_MODELS:
        if key == "resnet18-cifar":
            model = cifar_resnet18(num_classes=num_classes, in_channels=in_channels, **kwargs)
        elif key == "resnet50":
            model = resnet50(num_classes=num_classes, in_channels=in_channels, **kwargs)
        else:
            model = (vit_b16 if key == "vit-b16" else vit_small)(num_classes=num_classes, image_size=image_size,
                                                                 in_channels=in_channels, **kwargs)
        return model if weights is None else load_weights(model, weights)
    if key == "fcn":
        return FCN(in_features, num_classes, **kwargs)
    if key == "cnn":
        return CNN(in_channels, num_classes, image_size=image_size, **kwargs)
    close = difflib.get_close_matches(str(key), MODELS, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(
        f"unknown model {name!r}{hint}; valid names: {', '.join(MODELS)}, "
        f"or {TORCHVISION_PREFIX}<torchvision model name> (e.g. tv:resnet18)"
    )


_NN_PREFIX = "torch.nn."


def architecture_spec(name: str, in_channels: int, image_size: int, num_classes: int, **kwargs: Any) -> dict:
    """The JSON spec of ``build_model(name, in_channels, image_size, num_classes, **kwargs)`` for
    :func:`bayesprune.save_shrunk` (``torch.nn`` classes such as ``activation=nn.Tanh`` by name)."""
    encoded = {}
    for k, v in kwargs.items():
        if isinstance(v, type) and issubclass(v, nn.Module) and getattr(nn, v.__name__, None) is v:
            v = _NN_PREFIX + v.__name__
        elif isinstance(v, tuple):
            v = list(v)
        encoded[k] = v
    return {"name": name, "in_channels": in_channels, "image_size": image_size, "num_classes": num_classes,
            "kwargs": encoded}


def build_from_spec(spec: dict) -> nn.Module:
    """The builder for :func:`bayesprune.load_shrunk`: ``build_model`` from an :func:`architecture_spec`."""
    missing = {"name", "in_channels", "image_size", "num_classes"} - set(spec or {})
    if missing:
        raise ValueError(f"architecture spec lacks {', '.join(sorted(missing))} (the arguments of build_model)")
    kwargs = {k: getattr(nn, v[len(_NN_PREFIX):]) if isinstance(v, str) and v.startswith(_NN_PREFIX) else v
              for k, v in (spec.get("kwargs") or {}).items()}
    return build_model(spec["name"], spec["in_channels"], spec["image_size"], spec["num_classes"], **kwargs)
