"""Attention heads as structures: one noise variable per head, and whole heads removed.

``add_head_noise(model, example_inputs)`` puts a :class:`HeadNoise` on every multi-head
attention module it recognises: one theta_h per head h, multiplying that head's output
``o_h`` (its slice of the concatenated head outputs that enter the output projection), so the
attention computes ``W_o [theta_1 o_1, ..., theta_H o_H] + b_o``.  The variable is the same as a
channel's (docs/maths.md section 1: the same truncated log-normal posterior, log-uniform prior,
KL and draws; the structure is a head instead of a channel), so ``kl``, ``prune``, ``report``
and the criteria use it unchanged.  It is applied by a forward pre-hook on the output
projection's input, viewed as ``[..., heads, head_dim]``.

Removal (``bayesprune.shrink`` calls :func:`shrink_heads`): ``E[theta_h] * mask_h`` is folded
into the output projection's input columns of head h (exact: the projection is linear in each
head's output and a head's output depends on no other head), then the masked heads' query, key
and value rows and their output-projection columns are removed and the module's head count
updated.  Grouped key/value heads (Llama-style): a key/value head stays while any query head of
its group stays; when the kept groups have unequal numbers of query heads, each kept group's
key/value head is repeated so that every group holds ``r = gcd(group sizes)`` query heads (the
module's ``num_key_value_groups`` becomes r).  The result is checked against the masked model's
eval output on several inputs (``removal.VERIFY_RTOL``).

Families (a registry keyed by module type, :data:`ADAPTERS`): ``nn.MultiheadAttention`` (also
inside torchvision's ViT; its class becomes :class:`HeadwiseMultiheadAttention`, the same
function computed with the output projection called as a module), timm's ``Attention``,
Hugging Face BERT-style ``BertAttention`` (query/key/value + output.dense), GPT-2's
``GPT2Attention`` (``Conv1D`` c_attn/c_proj) and the q/k/v/o_proj family (Llama, Mistral,
Qwen2, Hugging Face ViT).

``shrink_for_training`` removes the masked heads without folding and keeps each head noise,
sliced to the kept heads.  :func:`uniform_heads` (``prune``/``shrink(..., uniform_heads=True)``)
gives every attention the same head layout, and :func:`update_hf_config` writes it into a
Hugging Face config so that ``save_pretrained`` / ``from_pretrained`` reload the shrunk model
(docs/shrink.md, "Attention heads").
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .noise import MultiplicativeNoise, _install_joint_draw, noise_layers, DEFAULT_SHARING, SHARING

__all__ = ["HeadNoise", "HeadwiseMultiheadAttention", "add_head_noise", "head_noise_layers",
           "shrink_heads", "replay_heads", "noise_origins", "ADAPTERS", "register_adapter", "update_hf_config", "uniform_heads"]


class HeadNoise(MultiplicativeNoise):
    """theta_h per attention head: ``o_h -> theta_h o_h`` on the output projection's input.

    A :class:`~bayesprune.noise.MultiplicativeNoise` with ``num_structures = num_heads`` along
    the head axis of the input viewed as ``[..., num_heads, head_dim]`` (docs/maths.md section 1).
    """

    def __init__(self, num_heads: int, head_dim: int, family: str = "", **kwargs):
        super().__init__(num_heads, dim=-2, **kwargs)
        self.head_dim, self.family = int(head_dim), family
        #: set by ``uniform_heads``: removal keeps ``uniform_groups`` key/value groups of
        #: ``uniform_size`` query heads each (masked heads kept zeroed where the masks hold fewer)
        self.uniform_groups: int | None = None
        self.uniform_size: int | None = None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", heads, head_dim={self.head_dim}"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        width = self.num_structures * self.head_dim
        if h.ndim < 1 or h.shape[-1] != width:
            raise ValueError(
                f"head noise for {self.layer_name!r} expects the concatenated outputs of {self.num_structures} heads "
                f"of size {self.head_dim} ({width} features) in the last dimension, got shape {tuple(h.shape)}"
            )
        out = super().forward(h.reshape(*h.shape[:-1], self.num_structures, self.head_dim))
        return out.reshape(h.shape)

    def _pre_hook(self, module, args):
        return (self(args[0]),) + tuple(args[1:])


def head_noise_layers(model: nn.Module) -> list[HeadNoise]:
    """The model's head noise modules, in forward order."""
    return [n for n in noise_layers(model) if isinstance(n, HeadNoise)]


# ---------------------------------------------------------------------------------------------
# Linear / Hugging Face Conv1D slicing (Conv1D keeps its weight as [in, out])


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and hasattr(mod, "nx")


def _check_proj(mod: nn.Module, where: str) -> None:
    if not (isinstance(mod, nn.Linear) or _is_conv1d(mod)):
        raise ValueError(f"{where} is a {type(mod).__name__}; head removal handles nn.Linear and Hugging Face Conv1D")


def _new_param(old: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.detach().clone().contiguous(), requires_grad=old.requires_grad)


def _keep_out(mod: nn.Module, idx: torch.Tensor) -> None:
    """Keep output features ``idx`` of a Linear or Conv1D (and of its channel noise, if any)."""
    idx = idx.to(mod.weight.device)
    noise = getattr(mod, "bayes_noise", None)
    if isinstance(noise, MultiplicativeNoise) and not isinstance(noise, HeadNoise):
        for pname in ("mu", "log_sigma"):
            setattr(noise, pname, _new_param(getattr(noise, pname), getattr(noise, pname)[idx.to(noise.mu.device)]))
        noise.mask = noise.mask[idx.to(noise.mask.device)].clone()
        noise.num_structures = len(idx)
    if _is_conv1d(mod):
        mod.weight = _new_param(mod.weight, mod.weight[:, idx])
        mod.nf = len(idx)
    else:
        mod.weight = _new_param(mod.weight, mod.weight[idx])
        mod.out_features = len(idx)
    if mod.bias is not None:
        mod.bias = _new_param(mod.bias, mod.bias[idx])


def _keep_in(mod: nn.Module, idx: torch.Tensor) -> None:
    """Keep input features ``idx`` of a Linear or Conv1D."""
    idx = idx.to(mod.weight.device)
    if _is_conv1d(mod):
        mod.weight = _new_param(mod.weight, mod.weight[idx])
        mod.nx = len(idx)
    else:
        mod.weight = _new_param(mod.weight, mod.weight[:, idx])
        mod.in_features = len(idx)


def _scale_in(mod: nn.Module, scale: torch.Tensor, head_dim: int) -> None:
    """Multiply the input columns of head h by ``scale[h]`` (the fold of E[theta] * mask)."""
    s = scale.to(device=mod.weight.device, dtype=mod.weight.dtype).repeat_interleave(head_dim)
    if _is_conv1d(mod):
        mod.weight.mul_(s[:, None])
    else:
        mod.weight.mul_(s[None, :])


def _features(heads, head_dim: int, offset: int = 0) -> torch.Tensor:
    """The feature indices of ``heads`` (each head_dim wide) starting at ``offset``."""
    heads = torch.as_tensor(list(heads), dtype=torch.long)
    return (offset + heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _packed(heads, num_heads: int, head_dim: int, parts: int = 3) -> torch.Tensor:
    """Indices of ``heads`` in a [q; k; v] packed projection output."""
    return torch.cat([_features(heads, head_dim, p * num_heads * head_dim) for p in range(parts)])


# ---------------------------------------------------------------------------------------------
# nn.MultiheadAttention with a free head count


def _additive_mask(mask, dtype, what: str):
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    if not mask.is_floating_point():
        raise ValueError(f"{what} must be a bool or floating-point tensor, got {mask.dtype}")
    return mask.to(dtype)


class HeadwiseMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` computed head by head, with ``num_heads * head_dim`` free of
    ``embed_dim`` (so heads can be removed) and ``out_proj`` called as a module (where head
    noise is applied).  The same function as the parent class: softmax(q k^T / sqrt(head_dim)
    + mask) v per head (Vaswani et al. 2017); packed or separate (``kdim``/``vdim``) in-projections,
    no ``bias_k``/``bias_v``, no ``add_zero_attn``."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, t, s = query.shape[0], query.shape[1], key.shape[1]
        h, d = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:  # kdim / vdim: separate projections (cross-attention over another width)
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, w_q, b_q).view(b, t, h, d).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(b, s, h, d).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(b, s, h, d).transpose(1, 2)
        scores = (q * d ** -0.5) @ k.transpose(-2, -1)  # [b, h, t, s]
        mask = _additive_mask(attn_mask, scores.dtype, "attn_mask")
        if mask is None and is_causal:
            mask = torch.ones(t, s, dtype=torch.bool, device=scores.device).triu(1)
            mask = _additive_mask(mask, scores.dtype, "attn_mask")
        if mask is not None:
            if mask.dim() == 3:
                if mask.shape[0] != b * h:
                    raise ValueError(f"attn_mask of shape {tuple(mask.shape)}: expected ({b * h}, {t}, {s}) for {h} heads")
                mask = mask.view(b, h, t, s)
            scores = scores + mask
        pad = _additive_mask(key_padding_mask, scores.dtype, "key_padding_mask")
        if pad is not None:
            scores = scores + pad.view(b, 1, 1, s)
        attn = F.dropout(scores.softmax(dim=-1), p=self.dropout, training=self.training)
        out = self.out_proj((attn @ v).transpose(1, 2).reshape(b, t, h * d))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = attn.mean(dim=1) if average_attn_weights else attn
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights


# ---------------------------------------------------------------------------------------------
# adapters: one per attention family


class Adapter:
    """How one attention family holds its heads.  ``out_proj``: the child whose input is the
    concatenated head outputs; ``heads(m)`` -> (query heads, head_dim); ``remove(m, keep)``
    keeps the query heads ``keep`` (sorted) and returns a JSON record that ``replay`` applies
    to a fresh module."""

    family = ""
    out_proj = ""

    def check(self, m: nn.Module, name: str) -> None:
        pass

    def prepare(self, m: nn.Module) -> None:
        pass

    def heads(self, m: nn.Module) -> tuple[int, int]:
        raise NotImplementedError

    def remove(self, m: nn.Module, keep: list[int]) -> dict:
        raise NotImplementedError

    def replay(self, m: nn.Module, record: dict) -> None:
        self.remove(m, record["keep"])


#: qualified class name (``module.QualName``) -> adapter; a subclass uses its parent's
ADAPTERS: dict[str, Adapter] = {}


def register_adapter(*qualnames: str):
    """Class decorator: register an :class:`Adapter` for the named attention classes."""
    def deco(cls):
        for q in qualnames:
            ADAPTERS[q] = cls()
        return cls
    return deco


def adapter_for(m: nn.Module) -> Adapter | None:
    for klass in type(m).__mro__:
        found = ADAPTERS.get(f"{klass.__module__}.{klass.__qualname__}")
        if found is not None:
            return found
    return None


@register_adapter("torch.nn.modules.activation.MultiheadAttention")
class _MHA(Adapter):
    family, out_proj = "nn.MultiheadAttention", "out_proj"

    def check(self, m, name):
        if m.bias_k is not None or m.add_zero_attn:
            raise ValueError(f"attention {name!r}: head noise does not handle add_bias_kv or add_zero_attn")

    def prepare(self, m):
        if not isinstance(m, HeadwiseMultiheadAttention):
            m.__class__ = HeadwiseMultiheadAttention

    def heads(self, m):
        return m.num_heads, m.head_dim

    def remove(self, m, keep):
        self.prepare(m)
        h, d = self.heads(m)
        idx = _packed(keep, h, d).to(m.out_proj.weight.device)
        if m._qkv_same_embed_dim:
            m.in_proj_weight = _new_param(m.in_proj_weight, m.in_proj_weight[idx])
        else:  # separate q/k/v projections (kdim / vdim): each keeps the heads' rows
            rows = _features(keep, d).to(idx.device)
            for pname in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                setattr(m, pname, _new_param(getattr(m, pname), getattr(m, pname)[rows]))
        if m.in_proj_bias is not None:
            m.in_proj_bias = _new_param(m.in_proj_bias, m.in_proj_bias[idx])
        _keep_in(m.out_proj, _features(keep, d))
        m.num_heads = len(keep)
        return {"keep": list(keep)}


@register_adapter("timm.layers.attention.Attention")
class _Timm(Adapter):
    family, out_proj = "timm Attention", "proj"

    def check(self, m, name):
        if not isinstance(m.norm, nn.Identity):
            raise ValueError(f"attention {name!r}: timm Attention with scale_norm normalises across heads; "
                             "heads are not separate structures there")

    def heads(self, m):
        return m.num_heads, m.head_dim

    def remove(self, m, keep):
        h, d = self.heads(m)
        _keep_out(m.qkv, _packed(keep, h, d))
        if getattr(m, "gate", None) is not None:
            _keep_out(m.gate, _features(keep, d))
        _keep_in(m.proj, _features(keep, d))
        m.num_heads, m.attn_dim = len(keep), len(keep) * d
        return {"keep": list(keep)}


@register_adapter("transformers.models.bert.modeling_bert.BertAttention",
                  "transformers.models.roberta.modeling_roberta.RobertaAttention")
class _Bert(Adapter):
    """Self- and cross-attention alike: query, key and value hold the heads' rows whichever
    hidden states (the decoder's, the encoder's) they read."""

    family, out_proj = "BERT attention", "output.dense"

    def heads(self, m):
        return m.self.num_attention_heads, m.self.attention_head_size

    def remove(self, m, keep):
        h, d = self.heads(m)
        for lin in (m.self.query, m.self.key, m.self.value):
            _keep_out(lin, _features(keep, d))
        _keep_in(m.output.dense, _features(keep, d))
        m.self.num_attention_heads, m.self.all_head_size = len(keep), len(keep) * d
        return {"keep": list(keep)}


@register_adapter("transformers.models.gpt2.modeling_gpt2.GPT2Attention")
class _GPT2(Adapter):
    """Self-attention: ``c_attn`` = [q; k; v]; cross-attention: ``q_attn`` = q, ``c_attn`` = [k; v]."""

    family, out_proj = "GPT-2 attention", "c_proj"

    def heads(self, m):
        return m.num_heads, m.head_dim

    def remove(self, m, keep):
        h, d = self.heads(m)
        if m.is_cross_attention:
            _keep_out(m.q_attn, _features(keep, d))
            _keep_out(m.c_attn, _packed(keep, h, d, parts=2))
        else:
            _keep_out(m.c_attn, _packed(keep, h, d))
        _keep_in(m.c_proj, _features(keep, d))
        m.num_heads, m.split_size = len(keep), len(keep) * d
        return {"keep": list(keep)}


@register_adapter("transformers.models.llama.modeling_llama.LlamaAttention",
                  "transformers.models.mistral.modeling_mistral.MistralAttention",
                  "transformers.models.qwen2.modeling_qwen2.Qwen2Attention",
                  "transformers.models.vit.modeling_vit.ViTAttention")
class _QKVO(Adapter):
    """q_proj/k_proj/v_proj/o_proj with ``head_dim`` and grouped key/value heads."""

    family, out_proj = "q/k/v/o_proj attention", "o_proj"

    def heads(self, m):
        return m.q_proj.out_features // m.head_dim, m.head_dim

    def kv_of(self, m) -> list[int]:
        """The key/value head each query head reads."""
        h, d = self.heads(m)
        rep = getattr(m, "num_key_value_groups", 1)
        return [q // rep for q in range(h)]

    def remove(self, m, keep):
        h, d = self.heads(m)
        kv = self.kv_of(m)
        sizes: dict[int, int] = {}
        for q in keep:
            sizes[kv[q]] = sizes.get(kv[q], 0) + 1
        # a) repeat each kept group's key/value head to hold r = gcd(sizes) query heads each, or
        # b) keep (zeroed) masked query heads until every kept group has max(sizes): the cheaper
        rep = math.gcd(*sizes.values())
        cost_a = 2 * len(keep) + 2 * len(keep) // rep
        top = max(sizes.values())
        cost_b = 2 * top * len(sizes) + 2 * len(sizes)
        if cost_b < cost_a:
            keep = sorted(keep + [q for g in sizes for q in [q for q in range(h) if kv[q] == g and q not in keep]
                                  [: top - sizes[g]]])
            new_kv, rep = sorted(sizes), top
        else:
            new_kv = [g for g in sorted(sizes) for _ in range(sizes[g] // rep)]
        self._apply(m, keep, new_kv, rep)
        return {"keep": list(keep), "kv": new_kv, "rep": rep}

    def _apply(self, m, keep, new_kv, rep):
        d = m.head_dim
        _keep_out(m.q_proj, _features(keep, d))
        _keep_out(m.k_proj, _features(new_kv, d))
        _keep_out(m.v_proj, _features(new_kv, d))
        _keep_in(m.o_proj, _features(keep, d))
        if hasattr(m, "num_key_value_groups"):
            m.num_key_value_groups = rep
        for attr in ("num_heads", "num_attention_heads"):
            if hasattr(m, attr):
                setattr(m, attr, len(keep))
        if hasattr(m, "num_key_value_heads"):
            m.num_key_value_heads = len(new_kv)

    def replay(self, m, record):
        self._apply(m, record["keep"], record["kv"], record["rep"])


# ---------------------------------------------------------------------------------------------
# placement


def add_head_noise(model: nn.Module, example_inputs, *, modules=None, sharing: str = DEFAULT_SHARING,
                   **noise_kwargs) -> nn.Module:
    """One :class:`HeadNoise` variable per head on every recognised attention module (in place).

    ``example_inputs``: a small input batch (tensor, tuple or dict of the forward's arguments),
    kept with the noise as by :func:`~bayesprune.add_noise` (which may be called before, for
    channel noise elsewhere).  ``modules``: names of the attention modules to use (default: every
    module of a registered family, :data:`ADAPTERS`); a named module of no registered family is
    refused.  ``sharing`` and ``noise_kwargs`` (``a``, ``b``, ``mu_init``, ``log_sigma_init``) as
    for :class:`~bayesprune.noise.MultiplicativeNoise`.  Returns the model.
    """
    if example_inputs is None:
        raise ValueError("add_head_noise needs example_inputs, a small input batch (e.g. x[:2])")
    if sharing not in SHARING:
        raise ValueError(f"unknown sharing {sharing!r}; valid: {', '.join(SHARING)}")
    if head_noise_layers(model):
        raise ValueError("model already has head noise; call remove_noise(model) first")
    named = dict(model.named_modules())
    if modules is None:
        chosen = [n for n, m in named.items() if adapter_for(m) is not None]
        if not chosen:
            raise ValueError("no attention module of a known family found; known: "
                             + ", ".join(sorted({a.family for a in ADAPTERS.values()})))
    else:
        chosen = []
        for name in modules:
            if name not in named:
                raise ValueError(f"no module named {name!r} in the model")
            if adapter_for(named[name]) is None:
                raise ValueError(f"module {name!r} is a {type(named[name]).__name__}, not an attention module of a known "
                                 "family (" + ", ".join(sorted({a.family for a in ADAPTERS.values()})) + ")")
            chosen.append(name)
    order0 = 1 + max((n.order for n in noise_layers(model)), default=-1)
    for i, name in enumerate(chosen):
        m, ad = named[name], adapter_for(named[name])
        ad.check(m, name)
        if getattr(m, "bayes_noise", None) is not None:
            raise ValueError(f"module {name!r} already holds a noise module")
        ad.prepare(m)
        heads, head_dim = ad.heads(m)
        proj = m.get_submodule(ad.out_proj)
        _check_proj(proj, f"{name}.{ad.out_proj}")
        noise = HeadNoise(heads, head_dim, family=ad.family, sharing=sharing, **noise_kwargs)
        noise.layer_name = name
        noise.target_name = f"{name}.{ad.out_proj}" if name else ad.out_proj
        noise.chain = [noise.target_name]
        noise.order = order0 + i
        noise.example_inputs = example_inputs
        p = proj.weight
        noise.to(device=p.device, dtype=p.dtype)
        noise.train(m.training)
        m.add_module("bayes_noise", noise)
        noise._handle = proj.register_forward_pre_hook(noise._pre_hook)
    for n in noise_layers(model):  # one shared example input, as add_noise keeps it
        if n.example_inputs is None:
            n.example_inputs = example_inputs
    _install_joint_draw(model)
    return model


# ---------------------------------------------------------------------------------------------
# removal


def _detach(model: nn.Module, noise: HeadNoise) -> None:
    noise._handle.remove()
    model.get_submodule(noise.layer_name)._modules.pop("bayes_noise", None)


@torch.no_grad()
def _slice_noise(noise: HeadNoise, keep: list[int]) -> None:
    """Keep the entries of heads ``keep`` in the noise's per-head parameters and mask."""
    idx = torch.as_tensor(keep, dtype=torch.long, device=noise.mu.device)
    for pname in ("mu", "log_sigma"):
        setattr(noise, pname, _new_param(getattr(noise, pname), getattr(noise, pname)[idx]))
    noise.mask = noise.mask[idx.to(noise.mask.device)].clone()
    noise.num_structures = len(keep)


def _remove_heads(model: nn.Module, fold: bool, keep_noise: bool = False) -> tuple[list, dict]:
    """Fold (optionally) and remove the masked heads of ``model`` in place, detaching the head
    noise (``keep_noise``: leaving it on, sliced to the kept heads); returns the replay record and
    the modules that keep a zeroed head (with why)."""
    record, kept = [], {}
    for noise in head_noise_layers(model):
        noise.check_finite()
        m = model.get_submodule(noise.layer_name)
        ad = adapter_for(m)
        mask = noise.mask.detach().cpu()
        if fold:
            scale = noise.expected_theta().double() * noise.mask.double()
            _scale_in(m.get_submodule(ad.out_proj), scale, noise.head_dim)
        if not keep_noise:
            _detach(model, noise)
        keep = [int(i) for i in torch.nonzero(mask != 0).flatten()]
        if getattr(noise, "uniform_groups", None) is not None:  # uniform_heads: the same layout in every attention
            padded = _pad(keep, _query_groups(m, ad), noise.uniform_groups, noise.uniform_size, noise.layer_name)
            if len(padded) > len(keep):
                kept[noise.layer_name] = (f"{len(padded) - len(keep)} masked head(s) stay (zeroed) so that every attention "
                                          f"keeps {len(padded)} heads (uniform_heads)")
            keep = padded
        elif not keep:  # a module needs one head for its shapes; folded to zero it adds nothing
            keep = [0]
            kept[noise.layer_name] = "every head masked: head 0 stays (zeroed)"
        if len(keep) < len(mask):
            rec = ad.remove(m, keep)
            if len(rec["keep"]) > len(keep):
                kept[noise.layer_name] = (f"{len(rec['keep']) - len(keep)} masked query head(s) stay (zeroed) so that every "
                                          "key/value group keeps the same number of query heads")
            record.append([noise.layer_name, ad.family, rec])
            if keep_noise:
                _slice_noise(noise, rec["keep"])
    return record, kept


def shrink_heads(model: nn.Module, example_inputs, rest, *, fold: bool, keep_noise: bool, verify: bool) -> nn.Module:
    """What ``removal._shrink`` does for a model with head noise: a copy with the masked heads
    removed (folded first with ``fold``), then ``rest(copy)`` for the channel noise if any is
    left, checked against the masked model's eval output on several inputs when ``verify``.
    ``keep_noise`` (``shrink_for_training``): nothing folded, each head noise stays on its
    attention with the kept heads' ``mu``, ``log_sigma`` and mask.  The record of removed heads
    goes to ``result.bayesprune_pruning["heads"]``."""
    from . import removal as _r  # removal calls this module

    m = copy.deepcopy(model)
    values = fold or keep_noise
    probes = _r._ProbeList(_r._probes(example_inputs) if values else [_r._probe(example_inputs)])
    reference = _r._eval_outputs(m, probes) if verify else None
    record, kept = _remove_heads(m, fold, keep_noise)
    carried = head_noise_layers(m) if keep_noise else []
    for noise in carried:  # off while the channel structures are removed, back on the result
        _detach(m, noise)
    if noise_layers(m):
        out = rest(m)
    else:
        out = m
        out.train(model.training)
        out.bayesprune_pruning = {**_r._input_spec(example_inputs), "steps": []}
        out.bayesprune_kept = {}
    if carried:
        stored = _r.stored_example_inputs(model)
        for noise in carried:
            out.get_submodule(noise.layer_name).add_module("bayes_noise", noise)
            noise._handle = out.get_submodule(noise.target_name).register_forward_pre_hook(noise._pre_hook)
            noise.example_inputs = stored if stored is not None else example_inputs
        _install_joint_draw(out)
    if verify:
        why = _r._mismatch(reference, out, probes, values=values)
        if why is not None:
            raise RuntimeError(f"removing attention heads did not reproduce the masked model's eval output: {why}")
    out.bayesprune_pruning["heads"] = record
    out.bayesprune_kept.update(kept)
    out.train(model.training)
    return out


def noise_origins(shrunk: nn.Module, record) -> dict[str, torch.Tensor]:
    """For ``shrunk = shrink_for_training(model)``: per head-noise parameter name, the heads of
    ``model``'s noise its entries come from (``record``: ``bayesprune_pruning["heads"]``)."""
    keep = {name: rec["keep"] for name, _, rec in record or ()}
    names = {id(m): name for name, m in shrunk.named_modules()}
    out = {}
    for noise in head_noise_layers(shrunk):
        idx = torch.as_tensor(keep.get(noise.layer_name, range(noise.num_structures)), dtype=torch.long)
        for pname, _ in noise.named_parameters(recurse=False):
            out[f"{names[id(noise)]}.{pname}"] = idx
    return out


@torch.no_grad()
def replay_heads(model: nn.Module, record) -> nn.Module:
    """Remove the heads ``record`` lists (``shrunk.bayesprune_pruning["heads"]``) from a fresh
    model of the original architecture (in place; used by :func:`~bayesprune.export.load_shrunk`)."""
    for name, family, rec in record or ():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no module {name!r} to remove heads from") from None
        ad = adapter_for(m)
        if ad is None or ad.family != family:
            raise ValueError(f"module {name!r} is a {type(m).__name__}; the record removes heads of a {family}")
        ad.prepare(m)
        ad.replay(m, rec)
    return model


# ---------------------------------------------------------------------------------------------
# one head layout in every attention (what a Hugging Face config can hold)


def _query_groups(m: nn.Module, ad: Adapter) -> list[int]:
    """The key/value group of each query head: grouped attention's, else each head its own."""
    if isinstance(ad, _QKVO):
        return ad.kv_of(m)
    return list(range(ad.heads(m)[0]))


def _sizes(groups: list[int], kept) -> dict[int, int]:
    """Kept query heads per key/value group."""
    out: dict[int, int] = {}
    for q in kept:
        out[groups[q]] = out.get(groups[q], 0) + 1
    return out


def check_uniform(count):
    """``uniform_heads`` as given: None (False, None), True, or a positive head count."""
    if count is None or count is False:
        return None
    if count is True:
        return True
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"uniform_heads must be True, False or a positive number of heads per attention, got {count!r}")
    return int(count)


def _layout(entries, count) -> tuple[int, int]:
    """(G, s): every attention keeps G key/value groups of s query heads.  ``entries``: per
    attention (name, groups, kept heads).  ``count=True``: the smallest layout that holds every
    attention's kept heads (G = most kept groups, s = most kept heads in one group); an int:
    G * s = count, as few key/value groups as that allows."""
    sizes = [_sizes(g, k) for _, g, k in entries]
    most_groups = max(1, max(len(sz) for sz in sizes))
    most_size = max(1, max(max(sz.values(), default=0) for sz in sizes))
    if count is True:
        return most_groups, most_size
    n_groups = min(len(set(g)) for _, g, _ in entries)
    group_size = min(min(g.count(x) for x in set(g)) for _, g, _ in entries)
    for s in range(group_size, most_size - 1, -1):  # fewest key/value heads first
        if count % s == 0 and most_groups <= count // s <= n_groups:
            return count // s, s
    name, _, kept = max(entries, key=lambda e: len(e[2]))
    raise ValueError(
        f"uniform_heads={count}: no layout of {count} heads holds every attention's kept heads ({name!r} keeps "
        f"{len(kept)}; grouped attention needs at least {most_groups} key/value groups of {most_size} query heads, "
        f"at most {n_groups} groups of {group_size}); use uniform_heads=True for the smallest that does"
    )


def _pad(keep: list[int], groups: list[int], n_groups: int, size: int, name: str) -> list[int]:
    """``keep`` plus masked heads (lowest index first) up to ``n_groups`` groups of ``size``."""
    sizes = _sizes(groups, keep)
    if len(sizes) > n_groups or any(v > size for v in sizes.values()):
        raise ValueError(f"attention {name!r} keeps {len(keep)} heads in {len(sizes)} key/value groups, more than the "
                         f"uniform layout of {n_groups} groups of {size} set before; call uniform_heads again")
    out = set(keep)
    for g in sorted(sizes):
        out.update([q for q in range(len(groups)) if groups[q] == g and q not in out][: size - sizes[g]])
    for g in [g for g in sorted(set(groups)) if g not in sizes][: n_groups - len(sizes)]:
        out.update([q for q in range(len(groups)) if groups[q] == g][:size])
    return sorted(out)


def clear_uniform(layers, restore=None) -> list:
    """Forget the uniform layouts set before (``prune``) and return them; ``restore``: a list
    this returned, set back instead."""
    heads = [n for n in layers if isinstance(n, HeadNoise)]
    old = [(getattr(n, "uniform_groups", None), getattr(n, "uniform_size", None)) for n in heads]
    for n, (g, s) in zip(heads, restore or [(None, None)] * len(heads)):
        n.uniform_groups, n.uniform_size = g, s
    return old


@torch.no_grad()
def revive_uniform(model: nn.Module, layers, sc, count, before) -> int:
    """Revive masked heads, highest keep score (``sc``, docs/maths.md section 3) first, so that
    every attention keeps the same layout: G key/value groups of s query heads (G * s heads;
    s = 1 outside grouped attention).  In each attention the kept groups are filled to s heads,
    then the groups with the best-scored masked heads are added until G.  ``before``: as for
    ``round_to`` (only heads alive then, with their old mask value); None: any head, set to 1.
    An attention with every head masked stays so; removal keeps masked heads (zeroed) where too
    few could be revived.  Returns G * s."""
    heads = [(i, n) for i, n in enumerate(layers) if isinstance(n, HeadNoise)]
    if not heads:
        raise ValueError("uniform_heads needs attention-head noise (bayesprune.add_head_noise); the model has none")
    entries = []
    for _, n in heads:
        m = model.get_submodule(n.layer_name)
        kept = [q for q, v in enumerate(n.mask.detach().cpu().tolist()) if v != 0]
        entries.append((n.layer_name, _query_groups(m, adapter_for(m)), kept))
    n_groups, size = _layout(entries, count)
    for (i, n), (_, groups, kept) in zip(heads, entries):
        n.uniform_groups, n.uniform_size = n_groups, size
        if not kept:
            continue
        score = sc[i].detach().cpu().double().nan_to_num(nan=-math.inf).tolist()
        alive = [True] * len(groups) if before is None else (before[i].detach().cpu() != 0).tolist()
        kept_set = set(kept)

        def masked(g):
            return sorted((q for q in range(len(groups)) if groups[q] == g and q not in kept_set and alive[q]),
                          key=lambda q: (-score[q], q))

        sizes = _sizes(groups, kept)
        revive = [q for g in sorted(sizes) for q in masked(g)[: size - sizes[g]]]
        others = [g for g in sorted(set(groups)) if g not in sizes and masked(g)]
        others.sort(key=lambda g: (-score[masked(g)[0]], g))
        revive += [q for g in others[: n_groups - len(sizes)] for q in masked(g)[:size]]
        if revive:
            idx = torch.tensor(revive, dtype=torch.long, device=n.mask.device)
            n.mask[idx] = 1.0 if before is None else before[i].to(n.mask.device)[idx]
    return n_groups * size


@torch.no_grad()
def uniform_heads(model: nn.Module, count=True, criterion=None, *, example_inputs=None):
    """Make every attention keep the same number of heads (in place), as a Hugging Face config
    holds one head count for all layers: masked heads are revived, highest keep scores of
    ``criterion`` first (default: ``bayesprune.pruning.DEFAULT_CRITERION``), see
    :func:`revive_uniform`; ``count``: True (the most any attention keeps) or that many heads.
    ``shrink`` then removes the same heads from every attention.  Returns the report of the new
    masks with the counts before (``structures_kept_unrounded``, ``params_kept_unrounded``,
    ``rounding_cost``: the compression this costs)."""
    from . import pruning as _p  # pruning imports removal, which imports this module
    from .removal import _example

    count = check_uniform(count)
    if count is None:
        raise ValueError("uniform_heads needs count=True or a number of heads per attention, got None/False")
    crit = _p.get_criterion(_p.DEFAULT_CRITERION if criterion is None else criterion)
    layers = _p._layers(model)
    example_inputs = _example(model, example_inputs)
    sc = _p._scores(model, layers, crit)
    old = [(n.mask.clone(), getattr(n, "uniform_groups", None), getattr(n, "uniform_size", None)) for n in layers]
    try:
        before = _p.report(model, example_inputs=example_inputs)
        n = revive_uniform(model, layers, sc, count, None)
        rep = _p.report(model, criterion=crit.name, rule=f"{crit.label}: masks made uniform, {n} heads in every attention",
                        example_inputs=example_inputs)
    except BaseException:
        for layer, (mask, g, s) in zip(layers, old):
            layer.mask.copy_(mask)
            if isinstance(layer, HeadNoise):
                layer.uniform_groups, layer.uniform_size = g, s
        raise
    rep.uniform_heads = n
    rep.structures_kept_unrounded, rep.params_kept_unrounded = before.structures_kept, before.params_kept
    return rep


# ---------------------------------------------------------------------------------------------
# Hugging Face config


def _shape_mismatch(model: nn.Module, config) -> str | None:
    """The first parameter or buffer whose shape differs in ``type(model)(config)`` (built on
    the meta device), or None."""
    try:
        with torch.device("meta"):
            fresh = type(model)(config)
    except Exception as e:
        return f"building {type(model).__name__} from it failed: {type(e).__name__}: {e}"
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    for k, v in model.state_dict().items():
        if k in want and want[k] != tuple(v.shape):
            return f"{type(model).__name__}(config) has {k} of shape {want[k]}, the model {tuple(v.shape)}"
    return None


def _mlp_widths(model: nn.Module, config) -> dict[str, int]:
    """{parameter name: the width it now has where ``type(model)(config)`` has
    ``config.intermediate_size``}, over the parameters outside the attentions (the MLPs)."""
    size = getattr(config, "intermediate_size", None)
    if not isinstance(size, int):
        return {}
    try:
        with torch.device("meta"):
            fresh = type(model)(config)
    except Exception:
        return {}
    from .pruning import block_role

    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in want and "attn" not in k and "attention" not in k}
    axis = {}  # block role of a parameter shrink narrowed -> the axis that was intermediate_size
    for k, shape in have.items():
        dims = [i for i, (w, got) in enumerate(zip(want[k], shape)) if w == size and got != w]
        if dims:
            axis[block_role(k)] = dims[0]
    # every block's parameter of such a role, narrowed or not
    return {k: shape[axis[block_role(k)]] for k, shape in have.items() if block_role(k) in axis}


def update_hf_config(model: nn.Module):
    """Set a shrunk Hugging Face model's ``config`` to its attention heads and MLP width (in
    place), so that ``save_pretrained`` / ``from_pretrained`` reload it; returns the config.

    Needs one MLP width in every block (``intermediate_size``: prune with ``uniform_widths=True``),
    one head layout in every attention (shrink with ``uniform_heads=True``) and a family
    whose config holds a head count and head size: q/k/v/o_proj attention (Llama, Mistral,
    Qwen2, ViT: ``num_attention_heads``, ``head_dim``, ``num_key_value_heads``).  Checked by
    building the model from the new config on the meta device.  Raises ``ValueError`` saying why
    otherwise: BERT and GPT-2 derive the head size from the hidden size (fewer heads cannot be
    expressed; save with :func:`bayesprune.save_shrunk`, reload with :func:`bayesprune.load_shrunk`).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "save_pretrained") or not hasattr(config, "num_attention_heads"):
        raise ValueError(f"update_hf_config needs a Hugging Face model (a config with num_attention_heads and "
                         f"save_pretrained); got a {type(model).__name__}")
    if _shape_mismatch(model, config) is None:
        return config  # the config already builds this model
    attn = [(name, m, adapter_for(m)) for name, m in model.named_modules() if adapter_for(m) is not None]
    layouts = {}
    for name, m, ad in attn:
        h, d = ad.heads(m)
        layouts[name] = (h, m.k_proj.out_features // d if isinstance(ad, _QKVO) else h, d)
    derived = [name for name, m, ad in attn if isinstance(ad, (_Bert, _GPT2)) and layouts[name][0] != config.num_attention_heads]
    if derived:
        raise ValueError(
            f"{derived[0]!r} keeps {layouts[derived[0]][0]} of {config.num_attention_heads} heads, and "
            f"{type(config).__name__} cannot say so: transformers {_tf_version()} sets the head size to hidden_size / "
            "num_attention_heads in BERT and GPT-2 attention (no head_dim, no per-layer head counts, no pruned_heads), so "
            "from_pretrained would build heads of another size. Save with bayesprune.save_shrunk(model, path) and reload "
            "with bayesprune.load_shrunk(path, model=<the unpruned architecture>)"
        )
    distinct = sorted(set(layouts.values()))
    if len(distinct) != 1:
        listed = ", ".join(f"{n}: {h} heads" for n, (h, _, _) in layouts.items())
        raise ValueError(f"the attentions keep different numbers of heads ({listed}); a {type(config).__name__} holds one "
                         "count for every layer: shrink with uniform_heads=True (or prune with uniform_heads=True)")
    h, kv, d = distinct[0]
    new = {"num_attention_heads": h, "head_dim": d}
    if hasattr(config, "num_key_value_heads"):
        new["num_key_value_heads"] = kv
    elif kv != h:
        raise ValueError(f"the attentions keep {kv} key/value heads for {h} query heads, and {type(config).__name__} "
                         "has no num_key_value_heads")
    widths = _mlp_widths(model, config)
    if len(set(widths.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in list(widths.items())[:4]) + (", ..." if len(widths) > 4 else "")
        raise ValueError(f"the MLPs keep different widths ({listed}); a {type(config).__name__} holds one intermediate_size "
                         "for every layer: prune with uniform_widths=True before shrinking")
    if widths:
        new["intermediate_size"] = next(iter(widths.values()))
    trial = copy.deepcopy(config)
    for k, v in new.items():
        setattr(trial, k, v)
    try:
        trial = type(config).from_dict(trial.to_dict())  # the validation from_pretrained runs
    except Exception as e:
        why = " ".join(str(e).split())
        raise ValueError(f"{type(config).__name__} refuses {h} attention heads of size {d}: {why}; shrink with "
                         "uniform_heads=<a head count it accepts> instead of True") from None
    why = _shape_mismatch(model, trial)
    if why is not None:
        raise ValueError(
            f"setting {type(config).__name__} to {', '.join(f'{k}={v}' for k, v in new.items())} does not describe the "
            f"model: {why}. update_hf_config sets the attention head fields and intermediate_size only; other widths "
            "that shrink removed are not in the config. Save with bayesprune.save_shrunk / load_shrunk"
        )
    for k, v in new.items():
        setattr(config, k, v)
    return config


def _tf_version() -> str:
    try:
        import transformers
    except ImportError:  # a model with a config attribute but no transformers
        return "(not installed)"
    return transformers.__version__
