"""Attention heads as structures (bayesprune.heads): one noise variable per head, pruned by the
criteria like any structure, whole heads removed by shrink; the shrunk model equals the masked
one on inputs other than the example, and reloads."""

import copy

import pytest
import torch
from torch import nn

import bayesprune as bp
from bayesprune import heads

from benchmark_module import load_benchmark

TOL = 1e-5  # max abs difference relative to the output scale


def _rel_err(a, b):
    return float((a - b).detach().abs().max() / a.detach().abs().max())


#: the benchmark's collapse (benchmarks/uniform_heads_cost.py): posteriors of the heads ``dead[layer]``
#: at the prior's lower end (BMRS_N removes them), the others kept
_collapse = load_benchmark("uniform_heads_cost").collapse


def _call(model, x):
    return model(**x) if isinstance(x, dict) else model(*x) if isinstance(x, tuple) else model(x)


def _train_step(model, x, out=lambda y: y):
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = out(_call(model, x)).square().mean() + bp.kl(model)
    loss.backward()
    noise = heads.head_noise_layers(model)
    assert all(n.mu.grad is not None and bool(n.mu.grad.abs().sum() > 0) for n in noise)
    opt.step()
    opt.zero_grad()
    model.eval()


def _prune_shrink(model, x, others, dead, out=lambda y: y):
    """Train step, collapse, prune with BMRS_N, shrink; the masks are the collapsed heads and the
    shrunk model equals the masked one on the example and on ``others``."""
    _train_step(model, x, out)
    _collapse(model, dead)
    rep = bp.prune(model, "bmrs_n")
    for n in heads.head_noise_layers(model):
        want = torch.ones(n.num_structures)
        want[list(dead.get(n.layer_name, ()))] = 0
        assert torch.equal(n.mask.cpu(), want), n.layer_name
    small = bp.shrink(model)
    assert rep.params_kept == bp.count_parameters(small) < bp.count_parameters(model)
    assert not bp.noise_layers(small)
    run = lambda m, i: out(_call(m, i))  # noqa: E731
    with torch.no_grad():
        for inp in [x] + list(others):
            assert _rel_err(run(model, inp), run(small, inp)) <= TOL
    return rep, small


# ---------------------------------------------------------------------------------------------
# nn.MultiheadAttention (torchvision's ViT encoder block)


@pytest.mark.parametrize("batch_first", [True, False])
def test_headwise_mha_is_nn_multihead_attention(batch_first):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    mha = copy.deepcopy(ref)
    heads.ADAPTERS["torch.nn.modules.activation.MultiheadAttention"].prepare(mha)
    assert isinstance(mha, heads.HeadwiseMultiheadAttention)
    q, k = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    pad = torch.rand(3, 7) > 0.6
    pad[:, 0] = False
    causal = torch.ones(5, 7, dtype=torch.bool).triu(1)
    for kwargs in ({}, {"key_padding_mask": pad}, {"attn_mask": causal}, {"attn_mask": causal.float() * -3.0},
                   {"key_padding_mask": pad, "average_attn_weights": False}):
        o1, w1 = ref(q, k, k, **kwargs)
        o2, w2 = mha(q, k, k, **kwargs)
        assert _rel_err(o1, o2) <= 1e-6 and _rel_err(w1, w2) <= 1e-6
    o1, _ = ref(q[0] if batch_first else q[:, 0], k[0] if batch_first else k[:, 0], k[0] if batch_first else k[:, 0])
    o2, _ = mha(q[0] if batch_first else q[:, 0], k[0] if batch_first else k[:, 0], k[0] if batch_first else k[:, 0])
    assert _rel_err(o1, o2) <= 1e-6


def _vision_block():
    from torchvision.models.vision_transformer import EncoderBlock

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(6, 16)
            self.block = EncoderBlock(num_heads=4, hidden_dim=16, mlp_dim=32, dropout=0.0, attention_dropout=0.0)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.block(self.embed(x)).mean(1))

    return Net()


def test_head_noise_is_the_channel_variable_on_each_heads_output():
    """Eval output = the network with out_proj's input columns of head h scaled by E[theta_h] *
    mask_h (computed here without the noise module); the KL is MultiplicativeNoise's."""
    torch.manual_seed(1)
    model = _vision_block().eval()
    x = torch.randn(2, 5, 6)
    heads.add_head_noise(model, x)
    (noise,) = bp.noise_layers(model)
    assert isinstance(noise, heads.HeadNoise) and noise.num_structures == 4 and noise.head_dim == 4
    with torch.no_grad():
        noise.mu.copy_(torch.tensor([-0.3, -1.0, -0.1, -2.0]))
        noise.log_sigma.copy_(torch.tensor([-1.0, -0.5, -3.0, 0.0]))
        noise.mask[1] = 0
        plain = copy.deepcopy(model)
        bp.remove_noise(plain)
        scale = (noise.expected_theta() * noise.mask).repeat_interleave(4)
        plain.block.self_attention.out_proj.weight.mul_(scale[None, :])
        assert _rel_err(plain(x), model(x)) <= 1e-6
        same = bp.MultiplicativeNoise(4)
        same.mu.copy_(noise.mu), same.log_sigma.copy_(noise.log_sigma)
        assert torch.allclose(noise.kl(), same.kl())


def test_mha_heads_removed_and_reloaded(tmp_path):
    torch.manual_seed(2)
    model = _vision_block().eval()
    x = torch.randn(2, 5, 6)
    bp.add_noise(model, x)  # channel noise on the MLP too
    heads.add_head_noise(model, x)
    others = [torch.randn(3, 5, 6), 2 * torch.randn(1, 9, 6)]
    rep, small = _prune_shrink(model, x, others, {"block.self_attention": [0, 2]})
    att = small.block.self_attention
    assert att.num_heads == 2 and att.head_dim == 4
    assert att.in_proj_weight.shape == (3 * 8, 16) and att.out_proj.weight.shape == (16, 8)
    assert [r.total for r in rep.layers if r.layer == "block.self_attention"] == [4]
    assert small.bayesprune_pruning["heads"] == [["block.self_attention", "nn.MultiheadAttention", {"keep": [1, 3]}]]
    path = tmp_path / "vit-block.pt"
    bp.save_shrunk(small, path)
    loaded = bp.load_shrunk(path, model=_vision_block())
    with torch.no_grad():
        for inp in others:
            assert torch.equal(loaded(inp), small(inp))


def test_every_head_masked_keeps_one_zeroed_head():
    torch.manual_seed(3)
    model = _vision_block().eval()
    x = torch.randn(2, 5, 6)
    heads.add_head_noise(model, x)
    with torch.no_grad():
        bp.noise_layers(model)[0].mask.zero_()
    small = bp.shrink(model)
    assert small.block.self_attention.num_heads == 1
    assert "every head masked" in small.bayesprune_kept["block.self_attention"]
    assert _rel_err(model(x), small(x)) <= TOL


def test_head_noise_refuses_what_it_cannot_handle():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="no attention module"):
        heads.add_head_noise(model, x)
    with pytest.raises(ValueError, match=r"module '0' is a Linear"):
        heads.add_head_noise(model, x, modules=["0"])
    with pytest.raises(ValueError, match="add_bias_kv"):
        heads.add_head_noise(nn.MultiheadAttention(8, 2, add_bias_kv=True), (torch.randn(1, 3, 8),) * 3)
    block = _vision_block()
    heads.add_head_noise(block, torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="already has head noise"):
        heads.add_head_noise(block, torch.randn(2, 5, 6))


# ---------------------------------------------------------------------------------------------
# timm


def _timm_vit():
    timm = pytest.importorskip("timm")
    return timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=4, mlp_ratio=2.0, num_classes=3)


def test_timm_vit_block_heads(tmp_path):
    torch.manual_seed(4)
    model = _timm_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    bp.add_noise(model, x)  # channel noise on qkv, proj, mlp: qkv's is cut to the kept heads
    heads.add_head_noise(model, x)
    others = [torch.randn(3, 3, 16, 16), 3 * torch.randn(1, 3, 16, 16)]
    _, small = _prune_shrink(model, x, others, {"blocks.0.attn": [1, 2, 3]})
    attn = small.blocks[0].attn
    assert attn.num_heads == 1 and attn.head_dim == 6 and attn.attn_dim == 6
    assert attn.qkv.weight.shape[0] <= 18 and attn.proj.weight.shape[1] == 6
    bp.save_shrunk(small, tmp_path / "timm.pt")
    loaded = bp.load_shrunk(tmp_path / "timm.pt", model=_timm_vit())
    with torch.no_grad():
        assert torch.equal(loaded(others[0]), small(others[0]))


# ---------------------------------------------------------------------------------------------
# Hugging Face


def _ids(seed, n=2, t=7):
    return {"input_ids": torch.randint(0, 50, (n, t), generator=torch.Generator().manual_seed(seed))}


def _hidden(y):
    return y.last_hidden_state


def _bert():
    tf = pytest.importorskip("transformers")
    cfg = tf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return tf.BertModel(cfg)


def test_bert_layer_heads(tmp_path):
    torch.manual_seed(5)
    model = _bert().eval()
    x = _ids(0)
    heads.add_head_noise(model, x)
    _, small = _prune_shrink(model, x, [_ids(1, 3, 5), _ids(2, 1, 9)], {"encoder.layer.0.attention": [0, 3]}, out=_hidden)
    att = small.encoder.layer[0].attention
    assert att.self.num_attention_heads == 2 and att.self.all_head_size == 16
    assert att.self.query.weight.shape == (16, 32) and att.output.dense.weight.shape == (32, 16)
    # BERT derives the head size from hidden_size / num_attention_heads: its config cannot hold 2
    # heads of size 8, so the library's loader reloads it
    config = copy.deepcopy(small.config.to_dict())
    with pytest.raises(ValueError, match=r"hidden_size / num_attention_heads.*save_shrunk"):
        heads.update_hf_config(small)
    assert small.config.to_dict() == config
    with pytest.raises(ValueError, match=r"'encoder.layer.0.attention' keeps 2 of 4 heads.*load_shrunk"):
        bp.shrink(model, uniform_heads=True)
    bp.save_shrunk(small, tmp_path / "bert.pt")
    loaded = bp.load_shrunk(tmp_path / "bert.pt", model=_bert())
    with torch.no_grad():
        assert torch.equal(_hidden(loaded(**_ids(3))), _hidden(small(**_ids(3))))


def test_gpt2_heads():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(6)
    cfg = tf.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16, use_cache=False,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = tf.GPT2Model(cfg).eval()
    x = _ids(0)
    heads.add_head_noise(model, x)
    assert [n.target_name for n in bp.noise_layers(model)] == ["h.0.attn.c_proj", "h.1.attn.c_proj"]
    _, small = _prune_shrink(model, x, [_ids(1, 3, 5)], {"h.0.attn": [1], "h.1.attn": [0, 2, 3]}, out=_hidden)
    assert [small.h[i].attn.num_heads for i in (0, 1)] == [3, 1]
    assert small.h[1].attn.c_attn.weight.shape == (32, 3 * 8) and small.h[1].attn.split_size == 8
    with pytest.raises(ValueError, match=r"'h.0.attn' keeps 3 of 4 heads.*GPT-2.*save_shrunk"):
        bp.shrink(model, uniform_heads=True)


def _llama(**kw):
    tf = pytest.importorskip("transformers")
    kw = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, **kw}
    cfg = tf.LlamaConfig(vocab_size=50, num_hidden_layers=2, intermediate_size=48, max_position_embeddings=16,
                         use_cache=False, **kw)
    return tf.LlamaModel(cfg)


def test_llama_grouped_kv_heads():
    """Query heads 0, 1 read key/value head 0, heads 2, 3 read head 1.  Layer 0 loses group 0
    (heads 0, 1): its key/value head goes.  Layer 1 loses head 0 only: group sizes 1 and 2."""
    torch.manual_seed(7)
    model = _llama().eval()
    x = _ids(0)
    heads.add_head_noise(model, x)
    _, small = _prune_shrink(model, x, [_ids(1, 3, 5)], {"layers.0.self_attn": [0, 1], "layers.1.self_attn": [0]},
                             out=_hidden)
    a0, a1 = small.layers[0].self_attn, small.layers[1].self_attn
    assert a0.q_proj.out_features == 16 and a0.k_proj.out_features == 8 and a0.num_key_value_groups == 2
    # sizes 1 and 2: repeating key/value heads (3 of them, 1 query each) costs as much as keeping
    # head 0 zeroed; the repeat is taken on a tie, and the module stays consistent
    q1, kv1 = a1.q_proj.out_features // 8, a1.k_proj.out_features // 8
    assert q1 == kv1 * a1.num_key_value_groups and a1.o_proj.in_features == q1 * 8


def test_llama_uniform_heads_reload_with_from_pretrained(tmp_path):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(8)
    model = _llama(head_dim=8).eval()
    x = _ids(0)
    heads.add_head_noise(model, x)
    dead = {"layers.0.self_attn": [1, 3], "layers.1.self_attn": [0, 2]}  # one query head per group
    _, small = _prune_shrink(model, x, [_ids(1, 3, 5)], dead, out=_hidden)
    assert heads.update_hf_config(small) is small.config
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 2)
    small.save_pretrained(tmp_path / "llama")
    loaded = tf.LlamaModel.from_pretrained(tmp_path / "llama").eval()
    with torch.no_grad():
        assert torch.equal(_hidden(loaded(**_ids(4))), _hidden(small(**_ids(4))))


def test_compression_search_and_l2_with_head_noise():
    """The compression= search counts removed heads (the shrunk network's count); L2 and grad,
    which score weight rows, refuse head noise by name."""
    torch.manual_seed(9)
    model = _vision_block().eval()
    x = torch.randn(2, 5, 6)
    heads.add_head_noise(model, x)
    _collapse(model, {"block.self_attention": []})
    total = bp.count_parameters(model)
    rep = bp.prune(model, "bmrs_n", compression=0.2)
    small = bp.shrink(model)
    assert rep.params_kept == bp.count_parameters(small) <= 0.8 * total
    kept = int(bp.noise_layers(model)[0].mask.sum())
    assert small.block.self_attention.num_heads == kept < 4
    with pytest.raises(ValueError, match="'block.self_attention' holds attention-head noise"):
        bp.prune(model, "l2", threshold=0.1)


# ---------------------------------------------------------------------------------------------
# Hugging Face ViT, and one head count in every layer (uniform_heads) for save_pretrained


def _hf_vit():
    tf = pytest.importorskip("transformers")
    cfg = tf.ViTConfig(image_size=16, patch_size=8, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tf.ViTForImageClassification(cfg)


def _logits(y):
    return y.logits


def _revived(model, layer, heads_):
    """A copy of ``model`` with the masks of ``heads_`` of attention ``layer`` set to 1."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        (n,) = [n for n in heads.head_noise_layers(ref) if n.layer_name == layer]
        n.mask[list(heads_)] = 1.0
    return ref


def _best(model, layer, candidates):
    """The candidate head of ``layer`` with the highest BMRS_N keep score."""
    i = [n.layer_name for n in bp.noise_layers(model)].index(layer)
    sc = bp.scores(model, "bmrs_n")[i]
    return max(candidates, key=lambda h: float(sc[h]))


def test_hf_vit_heads_removed_uniform_and_from_pretrained(tmp_path):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(10)
    model = _hf_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    bp.add_noise(model, x, layers=["vit.layers.0.mlp.fc1", "vit.layers.1.mlp.fc1"])  # channel noise too
    heads.add_head_noise(model, x)
    assert [n.target_name for n in heads.head_noise_layers(model)] == ["vit.layers.0.attention.o_proj",
                                                                      "vit.layers.1.attention.o_proj"]
    others = [torch.randn(3, 3, 16, 16), 2 * torch.randn(1, 3, 16, 16)]
    dead = {"vit.layers.0.attention": [0, 3], "vit.layers.1.attention": [2]}
    _, small = _prune_shrink(model, x, others, dead, out=_logits)
    assert [small.vit.layers[i].attention.q_proj.out_features for i in (0, 1)] == [12, 18]
    with pytest.raises(ValueError, match="different numbers of heads"):
        heads.update_hf_config(small)

    # uniform: layer 0 gets back its better masked head, every layer keeps 3 heads of size 6
    best = _best(model, "vit.layers.0.attention", [0, 3])
    ref = _revived(model, "vit.layers.0.attention", [best])
    big = bp.shrink(model, uniform_heads=True)
    assert all(n.mask.sum() < n.num_structures for n in heads.head_noise_layers(model))  # model untouched
    assert [big.vit.layers[i].attention.q_proj.out_features for i in (0, 1)] == [18, 18]
    assert big.bayesprune_pruning["heads"][0][2]["keep"] == sorted({1, 2, best})
    assert (big.config.num_attention_heads, big.config.head_dim, big.config.hidden_size) == (3, 6, 24)
    with torch.no_grad():
        for inp in [x] + others:
            assert _rel_err(ref(inp).logits, big(inp).logits) <= TOL
    # the report says what it cost: one head's q, k, v rows (with bias) and o_proj columns
    rep = heads.uniform_heads(copy.deepcopy(model))
    assert rep.uniform_heads == 3 and rep.params_kept == bp.count_parameters(big)
    assert rep.params_kept - rep.params_kept_unrounded == bp.count_parameters(big) - bp.count_parameters(small) \
        == 3 * (6 * 24 + 6) + 6 * 24
    assert rep.rounding_cost > 0 and "uniform_heads (3 heads in every attention)" in str(rep)

    big.save_pretrained(tmp_path / "vit")
    loaded = tf.ViTForImageClassification.from_pretrained(tmp_path / "vit").eval()
    with torch.no_grad():
        for inp in others:
            assert _rel_err(big(inp).logits, loaded(inp).logits) <= TOL


def test_prune_uniform_heads_pads_an_attention_with_every_head_masked(tmp_path):
    """prune(uniform_heads=True) revives heads where an attention keeps some; one whose heads are
    all masked stays so, and shrink keeps as many of its heads, zeroed, as the others keep."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(11)
    model = _hf_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    heads.add_head_noise(model, x)
    _train_step(model, x, _logits)
    _collapse(model, {"vit.layers.0.attention": [1], "vit.layers.1.attention": [0, 1, 2, 3]})
    rep = bp.prune(model, "bmrs_n", uniform_heads=True)
    n0, n1 = heads.head_noise_layers(model)
    # no mask revived; the cost: layer 1 keeps 3 zeroed heads instead of 1 (q, k, v rows, o_proj columns)
    assert rep.uniform_heads == 3 and rep.structures_kept == rep.structures_kept_unrounded == 3
    assert rep.params_kept - rep.params_kept_unrounded == 2 * (3 * (6 * 24 + 6) + 6 * 24)
    assert n0.mask.tolist() == [1, 0, 1, 1] and n1.mask.tolist() == [0, 0, 0, 0]
    small = bp.shrink(model)
    assert rep.params_kept == bp.count_parameters(small)
    assert [small.vit.layers[i].attention.q_proj.out_features for i in (0, 1)] == [18, 18]
    assert "3 masked head(s) stay (zeroed)" in small.bayesprune_kept["vit.layers.1.attention"]
    with torch.no_grad():
        assert _rel_err(model(x).logits, small(x).logits) <= TOL
    heads.update_hf_config(small)
    small.save_pretrained(tmp_path / "vit")
    loaded = tf.ViTForImageClassification.from_pretrained(tmp_path / "vit").eval()
    with torch.no_grad():
        assert _rel_err(small(x).logits, loaded(x).logits) <= TOL
    bp.prune(model, "bmrs_n")  # without uniform_heads: the layout is forgotten, one zeroed head stays
    assert n1.uniform_groups is None
    assert bp.shrink(model).vit.layers[1].attention.q_proj.out_features == 6


def test_llama_grouped_uniform_heads_from_pretrained(tmp_path):
    """8 query heads in 4 key/value groups (heads 2g, 2g+1 read group g).  Layer 0 keeps head 1 of
    group 0 and groups 2, 3; layer 1 groups 2, 3.  Uniform: 3 groups of 2 heads everywhere; layer
    0 gets head 0 back, layer 1 the group of its best-scored masked head."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(12)
    model = _llama(hidden_size=48, num_attention_heads=8, num_key_value_heads=4, head_dim=8).eval()
    x = _ids(0)
    heads.add_head_noise(model, x)
    _train_step(model, x, _hidden)
    _collapse(model, {"layers.0.self_attn": [0, 2, 3], "layers.1.self_attn": [0, 1, 2, 3]})
    with torch.no_grad():
        heads.head_noise_layers(model)[1].mu[3] = -18.5  # still removed, but the best of layer 1's masked
    bp.prune(model, "bmrs_n")
    assert [int(n.mask.sum()) for n in heads.head_noise_layers(model)] == [5, 4]
    g = _best(model, "layers.1.self_attn", [0, 1, 2, 3]) // 2
    ref = _revived(_revived(model, "layers.0.self_attn", [0]), "layers.1.self_attn", [2 * g, 2 * g + 1])
    big = bp.shrink(model, uniform_heads=True)
    for a in (big.layers[0].self_attn, big.layers[1].self_attn):
        assert (a.q_proj.out_features, a.k_proj.out_features, a.num_key_value_groups) == (48, 24, 2)
    assert (big.config.num_attention_heads, big.config.num_key_value_heads, big.config.head_dim) == (6, 3, 8)
    with torch.no_grad():
        for inp in (x, _ids(1, 3, 5)):
            assert _rel_err(_hidden(ref(**inp)), _hidden(big(**inp))) <= TOL
    big.save_pretrained(tmp_path / "llama")
    loaded = tf.LlamaModel.from_pretrained(tmp_path / "llama").eval()
    with torch.no_grad():
        assert _rel_err(_hidden(big(**_ids(4))), _hidden(loaded(**_ids(4)))) <= TOL


def test_uniform_heads_refusals():
    """A head count the config refuses (LlamaConfig: hidden_size a multiple of the head count),
    one below what an attention keeps, and a model without head noise: clear errors."""
    pytest.importorskip("transformers")
    torch.manual_seed(13)
    model = _llama(num_key_value_heads=4, head_dim=8).eval()
    x = _ids(0)
    heads.add_head_noise(model, x)
    _collapse(model, {"layers.0.self_attn": [1], "layers.1.self_attn": [0, 2]})
    bp.prune(model, "bmrs_n")
    with pytest.raises(ValueError, match=r"LlamaConfig refuses 3 attention heads.*not a multiple.*uniform_heads=<"):
        bp.shrink(model, uniform_heads=True)
    with pytest.raises(ValueError, match=r"uniform_heads=2: no layout of 2 heads.*'layers.0.self_attn' keeps 3"):
        bp.shrink(model, uniform_heads=2)
    full = bp.shrink(model, uniform_heads=4)  # every head back: nothing removed, the config as it was
    assert full.config.num_attention_heads == 4 and full.layers[1].self_attn.q_proj.out_features == 32
    with pytest.raises(ValueError, match="uniform_heads must be True, False or a positive number"):
        bp.shrink(model, uniform_heads=0)
    # round_to beside uniform_heads: the heads are uniform_heads' (round_to leaves them alone)
    rep = bp.prune(copy.deepcopy(model), "bmrs_n", round_to=2, uniform_heads=True)
    assert (rep.round_to, rep.uniform_heads) == (2, 3)
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    bp.add_noise(plain, torch.randn(2, 4))
    with pytest.raises(ValueError, match="uniform_heads needs attention-head noise"):
        bp.shrink(plain, uniform_heads=True)
    with pytest.raises(ValueError, match="needs a Hugging Face model"):
        heads.update_hf_config(plain)


# ---------------------------------------------------------------------------------------------
# shrink_for_training: the masked heads go, the kept heads' noise trains on


def test_shrink_for_training_keeps_the_kept_heads_noise():
    torch.manual_seed(14)
    model = _vision_block().eval()
    x = torch.randn(2, 5, 6)
    bp.add_noise(model, x)
    heads.add_head_noise(model, x)
    others = [torch.randn(3, 5, 6)]
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    (model(x).square().mean() + bp.kl(model)).backward()
    opt.step()
    opt.zero_grad()
    model.eval()
    _collapse(model, {"block.self_attention": [0, 2]})
    bp.prune(model, "bmrs_n")
    small = bp.shrink_for_training(model)
    (hn,) = heads.head_noise_layers(small)
    (old,) = heads.head_noise_layers(model)
    att = small.block.self_attention
    assert att.num_heads == 2 and hn.num_structures == 2 and hn.layer_name == "block.self_attention"
    assert torch.equal(hn.mu, old.mu[[1, 3]]) and torch.equal(hn.log_sigma, old.log_sigma[[1, 3]])
    assert hn.mask.tolist() == [1.0, 1.0] and bp.count_parameters(small) < bp.count_parameters(model)
    with torch.no_grad():
        for inp in [x] + others:
            assert _rel_err(model(inp), small(inp)) <= TOL
    # Adam's moments follow the kept heads (noise) and their q/k/v rows
    new_opt = torch.optim.Adam(small.parameters(), lr=1e-3)
    bp.removal.carry_optimizer_state(model, opt, small, new_opt)
    assert torch.equal(new_opt.state[hn.mu]["exp_avg"], opt.state[old.mu]["exp_avg"][[1, 3]])
    rows = torch.cat([torch.arange(4, 8), torch.arange(12, 16)])  # heads 1, 3 of the query block
    w_old = model.block.self_attention.in_proj_weight
    assert torch.equal(new_opt.state[att.in_proj_weight]["exp_avg"][:8], opt.state[w_old]["exp_avg"][rows])
    _train_step(small, x)  # gradients reach the kept heads' noise
    final = bp.shrink(small)
    with torch.no_grad():
        assert _rel_err(small(others[0]), final(others[0])) <= TOL


def test_shrink_for_training_grouped_llama():
    """Layer 1 keeps heads 1, 2, 3 (groups of 1 and 2): key/value head 1 repeated; the noise keeps
    the kept query heads' entries and the model trains on."""
    torch.manual_seed(15)
    model = _llama().eval()
    x = _ids(0)
    heads.add_head_noise(model, x)
    _collapse(model, {"layers.0.self_attn": [0, 1], "layers.1.self_attn": [0]})
    bp.prune(model, "bmrs_n")
    small = bp.shrink_for_training(model)
    n0, n1 = heads.head_noise_layers(small)
    assert (n0.num_structures, n1.num_structures) == (2, 3)
    assert torch.equal(n1.mu, heads.head_noise_layers(model)[1].mu[[1, 2, 3]])
    with torch.no_grad():
        for inp in (x, _ids(1, 3, 5)):
            assert _rel_err(_hidden(model(**inp)), _hidden(small(**inp))) <= TOL
    _train_step(small, x, _hidden)


def test_update_hf_config_refuses_widths_outside_the_heads():
    """MLP neurons removed in one block only: no intermediate_size describes the model, and
    update_hf_config (so shrink(uniform_heads=True)) says so, naming uniform_widths, instead of
    writing a config that from_pretrained cannot load; prune(uniform_heads=True) + shrink still
    gives the model."""
    pytest.importorskip("transformers")
    torch.manual_seed(16)
    model = _hf_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    bp.add_noise(model, x, layers=["vit.layers.0.mlp.fc1"])
    heads.add_head_noise(model, x)
    model.eval()  # add_noise leaves its new noise modules in training mode
    _collapse(model, {"vit.layers.0.attention": [0], "vit.layers.1.attention": [1]})
    with torch.no_grad():
        (fc1,) = [n for n in bp.noise_layers(model) if not isinstance(n, heads.HeadNoise)]
        fc1.mu[:5], fc1.log_sigma[:5] = -19.0, 0.0
    bp.prune(model, "bmrs_n", uniform_heads=True)
    with pytest.raises(ValueError, match=r"MLPs keep different widths \(vit.layers.0.mlp.fc1.weight: 27, .*"
                                         r"vit.layers.1.mlp.fc1.weight: 32.*uniform_widths=True"):
        bp.shrink(model, uniform_heads=True)
    small = bp.shrink(model)
    assert [small.vit.layers[i].attention.q_proj.out_features for i in (0, 1)] == [18, 18]
    assert small.config.num_attention_heads == 4  # untouched
    with torch.no_grad():
        assert _rel_err(model(x).logits, small(x).logits) <= TOL


def test_prune_uniform_heads_monotone_revives_only_heads_alive_before():
    """A head masked by an earlier prune step stays masked under monotone=True (removal keeps it
    zeroed to fill the layout); monotone=False revives the best-scored one."""
    pytest.importorskip("transformers")
    torch.manual_seed(17)
    model = _hf_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    heads.add_head_noise(model, x)
    _collapse(model, {"vit.layers.0.attention": [0], "vit.layers.1.attention": [1, 2]})
    with torch.no_grad():
        heads.head_noise_layers(model)[1].mu[2] = -18.5  # still removed, the better of the two
    bp.prune(model, "bmrs_n")
    rep = bp.prune(model, "bmrs_n", uniform_heads=True)
    n0, n1 = heads.head_noise_layers(model)
    assert rep.uniform_heads == 3 and n1.mask.tolist() == [1, 0, 0, 1]
    small = bp.shrink(model)
    assert small.vit.layers[1].attention.q_proj.out_features == 18
    assert "1 masked head(s) stay (zeroed)" in small.bayesprune_kept["vit.layers.1.attention"]
    with torch.no_grad():
        assert _rel_err(model(x).logits, small(x).logits) <= TOL
    best = _best(model, "vit.layers.1.attention", [1, 2])
    assert best == 2
    bp.prune(model, "bmrs_n", uniform_heads=True, monotone=False)
    assert n1.mask.tolist() == [1.0 if h in (0, 3, best) else 0.0 for h in range(4)]


def test_block_role_names_the_place_in_the_repeated_block():
    from bayesprune.pruning import block_role

    assert block_role("model.layers.3.mlp.act_fn") == block_role("model.layers.0.mlp.act_fn") == "model.layers.*.mlp.act_fn"
    assert block_role("layer1.0.bn1") == "layer1.*.bn1"
    assert block_role("features.3") == "features.3" != block_role("features.7")  # one Sequential's layers differ
    assert block_role("0") == "0" and block_role("3.conv.1") == "*.conv.1"


def test_llama_uniform_mlp_widths_reload_with_from_pretrained(tmp_path):
    """MLP neurons pruned to different widths per block: update_hf_config refuses, naming
    uniform_widths; with prune(uniform_widths=True) every block keeps the widest block's count
    (revived by keep score), intermediate_size is set and from_pretrained rebuilds the model."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(9)
    model = _llama(head_dim=8).eval()
    x = _ids(0)
    # noise on the MLP neurons only: gate_proj and up_proj of each block, coupled (their product
    # feeds down_proj); attention heads are add_head_noise's
    bp.add_noise(model, x, layers=[f"layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")])
    mlp = [n for n in bp.noise_layers(model) if ".mlp." in n.layer_name]
    assert [n.layer_name.split(".", 2)[2] for n in mlp] == ["mlp.gate_proj", "mlp.up_proj"] * 2
    assert all(n.num_structures == 48 for n in mlp)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in bp.noise_layers(model):
            n.mu.copy_(-0.5 * torch.rand(n.mu.shape, generator=g))
            n.log_sigma.fill_(-4.0)
        for n, dead in zip(mlp, (30, 30, 12, 12)):  # block 0 keeps 18 neurons, block 1 keeps 36
            n.mu[:dead] = -19.0 + 0.3 * torch.rand(dead, generator=g)  # distinct keep scores among the removed
            n.log_sigma[:dead] = 0.0
    ragged = copy.deepcopy(model)
    bp.prune(ragged, "bmrs_n")
    assert [int(n.mask.sum()) for n in bp.noise_layers(ragged)] == [18, 18, 36, 36]
    with pytest.raises(ValueError, match="MLPs keep different widths.*uniform_widths=True"):
        heads.update_hf_config(bp.shrink(ragged.eval(), x))
    scores = [s for s, n in zip(bp.scores(model, "bmrs_n"), bp.noise_layers(model)) if ".mlp." in n.layer_name]
    rep = bp.prune(model, "bmrs_n", uniform_widths=True)
    assert rep.uniform_widths and [int(n.mask.sum()) for n in mlp] == [36, 36, 36, 36]
    # block 0's 18 revived neurons are its removed ones of highest keep score (a neuron's score:
    # the higher of its gate's and its up projection's)
    revived = set((mlp[0].mask != 0).nonzero().flatten().tolist()) - set(range(30, 48))
    assert torch.equal(mlp[0].mask, mlp[1].mask)
    removed_scores = torch.maximum(scores[0], scores[1])[:30]
    assert revived == set(torch.argsort(removed_scores, descending=True)[:18].tolist())
    assert rep.params_kept > rep.params_kept_unrounded and "uniform_widths" in str(rep)
    small = bp.shrink(model.eval(), x)
    with torch.no_grad():
        ref = _hidden(model(**_ids(4)))
        assert _rel_err(ref, _hidden(small(**_ids(4)))) < TOL
    assert heads.update_hf_config(small).intermediate_size == 36
    small.save_pretrained(tmp_path / "llama")
    loaded = tf.LlamaModel.from_pretrained(tmp_path / "llama").eval()
    with torch.no_grad():
        assert torch.equal(_hidden(loaded(**_ids(4))), _hidden(small(**_ids(4))))
    with pytest.raises(ValueError, match="uniform_widths must be True or False"):
        bp.prune(model, "bmrs_n", uniform_widths=1)


def test_hf_vit_uniform_heads_and_widths_reload_with_from_pretrained(tmp_path):
    """Head noise and MLP-neuron noise in one ViT: prune(uniform_heads=True, uniform_widths=True)
    gives every attention 3 heads and every MLP 27 neurons (the widest block's), shrink is exact,
    update_hf_config sets both, and from_pretrained rebuilds the same outputs."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(3)
    model = _hf_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    bp.add_noise(model, x, layers=["vit.layers.0.mlp.fc1", "vit.layers.1.mlp.fc1"])
    heads.add_head_noise(model, x)
    model.eval()
    _collapse(model, {"vit.layers.0.attention": [0], "vit.layers.1.attention": [1, 2]})
    fc1 = [n for n in bp.noise_layers(model) if not isinstance(n, heads.HeadNoise)]
    with torch.no_grad():
        for n, dead in zip(fc1, (11, 5)):
            n.mu.copy_(-0.5 * torch.rand(n.mu.shape, generator=torch.Generator().manual_seed(dead)))
            n.log_sigma.fill_(-4.0)
            n.mu[:dead], n.log_sigma[:dead] = -19.0, 0.0
    rep = bp.prune(model, "bmrs_n", uniform_heads=True, uniform_widths=True)
    assert [int(n.mask.sum()) for n in fc1] == [27, 27] and rep.uniform_heads == 3 and rep.uniform_widths
    assert "uniform_widths and uniform_heads (3 heads in every attention)" in str(rep)
    small = bp.shrink(model, x)
    x2 = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert _rel_err(model(x2).logits, small(x2).logits) <= TOL
    config = heads.update_hf_config(small)
    assert (config.intermediate_size, config.num_attention_heads) == (27, 3)
    small.save_pretrained(tmp_path / "vit")
    loaded = tf.ViTForImageClassification.from_pretrained(tmp_path / "vit").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x2).logits, small(x2).logits)


# ---------------------------------------------------------------------------------------------
# cross-attention: queries from one sequence, keys and values from another


class _CrossBlock(nn.Module):
    """Decoder states attend to an encoder memory of another width (kdim = vdim = 10)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, kdim=10, vdim=10, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x, memory):
        return self.out(self.attn(x, memory, memory, need_weights=False)[0])


def test_mha_cross_attention_with_kdim_vdim_heads(tmp_path):
    torch.manual_seed(9)
    model = _CrossBlock().eval()
    assert not model.attn._qkv_same_embed_dim
    x = (torch.randn(2, 5, 16), torch.randn(2, 7, 10))
    plain = copy.deepcopy(model)
    heads.add_head_noise(model, x)
    others = [(torch.randn(3, 4, 16), torch.randn(3, 9, 10))]
    rep, small = _prune_shrink(model, x, others, {"attn": [1, 2]})
    att = small.attn
    assert att.num_heads == 2 and att.q_proj_weight.shape == (8, 16) and att.k_proj_weight.shape == (8, 10)
    assert att.v_proj_weight.shape == (8, 10) and att.in_proj_bias.shape == (24,) and att.out_proj.weight.shape == (16, 8)
    bp.save_shrunk(small, tmp_path / "cross.pt")
    loaded = bp.load_shrunk(tmp_path / "cross.pt", model=_CrossBlock())
    with torch.no_grad():
        assert torch.equal(loaded(*others[0]), small(*others[0]))
    # before any training the head-by-head computation is nn.MultiheadAttention's
    fresh = copy.deepcopy(plain)
    fresh.attn.__class__ = heads.HeadwiseMultiheadAttention
    with torch.no_grad():
        assert _rel_err(plain(*others[0]), fresh(*others[0])) <= 1e-6


def test_bert_decoder_cross_attention_heads():
    """A BERT decoder layer with cross-attention (keys/values from encoder states): self- and
    cross-attention lose heads independently, the shrunk decoder equals the masked one."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(10)
    cfg = tf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, is_decoder=True, add_cross_attention=True)
    model = tf.BertModel(cfg).eval()

    def inputs(seed, n=2, t=6, s=5):
        g = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(0, 50, (n, t), generator=g),
                "encoder_hidden_states": torch.randn(n, s, 32, generator=g), "use_cache": False}

    x = inputs(0)
    heads.add_head_noise(model, x)
    names = sorted(n.layer_name for n in heads.head_noise_layers(model))
    assert names == ["encoder.layer.0.attention", "encoder.layer.0.crossattention"]
    dead = {"encoder.layer.0.attention": [1], "encoder.layer.0.crossattention": [0, 2, 3]}
    _, small = _prune_shrink(model, x, [inputs(1, 3, 4, 8)], dead, out=_hidden)
    cross = small.encoder.layer[0].crossattention
    assert cross.self.num_attention_heads == 1 and cross.self.key.weight.shape == (8, 32)
    assert small.encoder.layer[0].attention.self.num_attention_heads == 3


def test_gpt2_cross_attention_heads():
    """GPT-2 with cross-attention: q_attn holds the queries, c_attn [keys; values] of the encoder states."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(11)
    cfg = tf.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4, n_positions=16, use_cache=False,
                        add_cross_attention=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = tf.GPT2Model(cfg).eval()

    def inputs(seed, n=2, t=6, s=5):
        g = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(0, 50, (n, t), generator=g),
                "encoder_hidden_states": torch.randn(n, s, 32, generator=g)}

    x = inputs(0)
    heads.add_head_noise(model, x)
    assert sorted(n.layer_name for n in heads.head_noise_layers(model)) == ["h.0.attn", "h.0.crossattention"]
    _, small = _prune_shrink(model, x, [inputs(1, 3, 4, 8)], {"h.0.crossattention": [1, 3]}, out=_hidden)
    cross = small.h[0].crossattention
    assert cross.num_heads == 2 and cross.split_size == 16
    assert cross.q_attn.weight.shape == (32, 16) and cross.c_attn.weight.shape == (32, 32)
    assert cross.c_proj.weight.shape == (16, 32) and small.h[0].attn.num_heads == 4
