"""Torch-Pruning is reached through bayesprune._torch_pruning only, which refuses too old a release
by name and maps the 1.5.x and 1.6.x layouts of its private helpers onto one set of names."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from bayesprune import _torch_pruning as tpc

SRC = Path(__file__).resolve().parents[1] / "src" / "bayesprune"


def test_no_other_module_imports_torch_pruning():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "_torch_pruning.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [f"{path.relative_to(SRC)}:{node.lineno}" for n in names if n.split(".")[0] == "torch_pruning"]
    assert offenders == []


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=240)


def test_too_old_a_release_is_refused_naming_the_version_needed():
    out = _run("""
        from importlib import metadata
        real = metadata.version
        metadata.version = lambda name: "1.4.3" if name == "torch-pruning" else real(name)
        import bayesprune  # Torch-Pruning is imported (and checked) at its first use, not here
        import torch
        from torch import nn
        m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        bayesprune.add_noise(m, torch.zeros(2, 4))
        bayesprune.shrink(m)
    """)
    assert out.returncode != 0
    assert "ImportError: bayesprune needs Torch-Pruning >= 1.5.0" in out.stderr and "found 1.4.3" in out.stderr


def test_the_1_5_layout_is_used_when_the_1_6_modules_are_absent():
    """Torch-Pruning 1.5.x: no dependency.index_mapping / shape_infer; the helpers come from
    _helpers and DependencyGraph (faked here on the installed release)."""
    out = _run("""
        import importlib.util, sys, types
        import torch_pruning
        calls = []
        if importlib.util.find_spec("torch_pruning.dependency").submodule_search_locations is None:  # a real 1.5.x
            from torch_pruning._helpers import _FlattenIndexMapping as expected
            real = torch_pruning.DependencyGraph._infer_out_channels_recursively
        else:  # 1.6 or later installed: hide its modules, give it the 1.5 names
            import torch_pruning.dependency.index_mapping as im, torch_pruning.dependency.shape_infer as si
            helpers = types.ModuleType("torch_pruning._helpers")
            helpers.__dict__.update(vars(sys.modules["torch_pruning._helpers"]))
            helpers._FlattenIndexMapping = expected = im._FlattenIndexMapping
            sys.modules["torch_pruning._helpers"] = helpers
            sys.modules["torch_pruning.dependency.index_mapping"] = None
            sys.modules["torch_pruning.dependency.shape_infer"] = None
            real = lambda self, node, depth: si.infer_out_channels_recursively(self, node, depth)
        def method(self, node, depth):
            calls.append(list(depth))
            return real(self, node, depth)
        torch_pruning.DependencyGraph._infer_out_channels_recursively = method
        from bayesprune import _torch_pruning as tpc
        assert tpc.FlattenIndexMapping is expected
        import torch
        from torch import nn
        import bayesprune as bp
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        x = torch.randn(2, 1, 8, 8)
        bp.add_noise(m, x)
        bp.noise_layers(m)[0].mask[[0, 2]] = 0
        m.eval()
        small = bp.shrink(m)
        assert small[0].out_channels == 2 and small[3].in_features == 2 * 6 * 6, small
        assert torch.allclose(small(x), m(x), rtol=1e-4, atol=1e-5)
        plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten())
        graph = tpc.DependencyGraph().build_dependency(plain, example_inputs=x)
        calls.clear()  # Torch-Pruning 1.5 calls it itself while building the graph
        assert tpc.infer_out_channels(graph, graph.module2node[plain[0]]) == 4
        assert calls and calls[0] == [0], calls
        print("ok")
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_names_are_torch_pruning_s_own():
    import torch_pruning as tp

    assert tpc.DependencyGraph is tp.DependencyGraph
    assert tpc.prune_linear_out_channels is tp.prune_linear_out_channels
    assert tpc.prune_conv_out_channels is tp.prune_conv_out_channels
    assert tpc.count_ops_and_params is tp.utils.count_ops_and_params
    assert tpc.OPTYPE is tp.ops.OPTYPE
    assert tpc.VERSION.split(".")[:2] >= ["1", "5"]


@pytest.mark.parametrize("shape", [(4, 3, 3), (2, 5, 5)])
def test_infer_out_channels_reads_the_channels_of_a_conv(shape):
    model = nn.Sequential(nn.Conv2d(1, shape[0], 3), nn.ReLU(), nn.Flatten())
    graph = tpc.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 1, 8, 8))
    node = graph.module2node[model[0]]
    assert tpc.infer_out_channels(graph, node) == shape[0]


def test_pruning_group_that_never_settles_raises_at_its_bound():
    """Llama's rotary embedding (half rotations concatenated back) gives index sets from q_proj
    that never repeat: the bounded group raises GroupDoesNotSettle naming the layer, quickly,
    instead of propagating for minutes (shrink keeps such a layer with that reason)."""
    tf = pytest.importorskip("transformers")
    import time

    from bayesprune.removal import _build_graph

    torch.manual_seed(0)
    model = tf.LlamaModel(tf.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=48, use_cache=False)).eval()
    graph = _build_graph(model, torch.randint(0, 50, (2, 6)))
    q = model.layers[0].self_attn.q_proj
    t = time.perf_counter()
    with pytest.raises(tpc.GroupDoesNotSettle, match="did not settle after"):
        graph.get_pruning_group(q, tpc.prune_linear_out_channels, idxs=[0, 5])
    assert time.perf_counter() - t < 30
    # the MLP's neurons settle: an ordinary group (up_proj's outputs with gate/down)
    up = model.layers[0].mlp.up_proj
    group = graph.get_pruning_group(up, tpc.prune_linear_out_channels, idxs=[0, 5])
    assert any(dep.target.module is model.layers[0].mlp.down_proj for dep, _ in group)


def test_split_part_read_twice_builds_a_graph_and_its_mapping_is_refused():
    """A split part read by more nodes than the split has parts: Torch-Pruning's own shape
    inference raised IndexError building the graph (torchvision RetinaNet/FCOS heads); here the
    widths it cannot infer are None, the graph builds, and a removal through the split raises
    GroupCannotBeMapped naming it, with the group bound off again afterwards."""
    from test_zoo_blocks import _SplitReadTwice

    model, x = _SplitReadTwice().eval(), torch.randn(1, 3, 4, 4)
    tpc._shape_infer.infer_out_channels_recursively = tpc._recursive_out_channels  # Torch-Pruning's own
    try:
        with pytest.raises(IndexError):
            tpc.DependencyGraph().build_dependency(model, example_inputs=x)
    finally:
        tpc._shape_infer.infer_out_channels_recursively = tpc._out_channels_or_unknown
    graph = tpc.DependencyGraph().build_dependency(model, example_inputs=x)
    assert tpc.infer_out_channels(graph, graph.module2node[model.conv]) == 4
    graph = tpc.new_graph().build_dependency(model, example_inputs=x)
    with pytest.raises(tpc.GroupCannotBeMapped, match="through a split"):
        graph.get_pruning_group(model.conv, tpc.CONV_PRUNER.prune_out_channels, idxs=[0])
    assert tpc._GROUP_LIMIT.items is None and tpc._GROUP_LIMIT.root is None


def test_flatten_mapping_past_its_bound_raises_naming_the_sizes(monkeypatch):
    """Inside a bounded group, a flatten mapping that would produce more than MAX_MAPPED_INDICES
    indices raises GroupDoesNotSettle with the sizes; below the bound the group is Torch-Pruning's."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    graph = tpc.new_graph().build_dependency(model, example_inputs=torch.randn(1, 1, 8, 8))
    group = graph.get_pruning_group(model[0], tpc.CONV_PRUNER.prune_out_channels, idxs=[1, 2])
    linear = [idxs for dep, idxs in group.items if dep.target.module is model[3]]
    assert sorted(int(i) for i in linear[0]) == list(range(36, 108))  # channels 1-2 x 36 positions
    monkeypatch.setattr(tpc, "MAX_MAPPED_INDICES", 50)
    with pytest.raises(tpc.GroupDoesNotSettle, match=r"mapped 72 indices .*2 indices x stride 36.*MAX_MAPPED_INDICES = 50"):
        graph.get_pruning_group(model[0], tpc.CONV_PRUNER.prune_out_channels, idxs=[1, 2])


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("stride", [1, 3, 49])
def test_fast_flatten_mapping_makes_torch_pruning_s_list(reverse, stride):
    """The flatten mapping bayesprune installs returns the list Torch-Pruning's own makes (same
    indices, root indices, order and type), forward and reversed (deduplicated)."""
    g = torch.Generator().manual_seed(stride)
    hybrid = tpc._HybridIndex
    idxs = [hybrid(idx=int(i), root_idx=int(r))
            for i, r in zip(torch.randint(0, 300, (200,), generator=g), torch.randint(0, 40, (200,), generator=g))]
    mapping = tpc.FlattenIndexMapping(stride=stride, reverse=reverse)
    fast, own = tpc._fast_flatten_call(mapping, idxs), tpc._flatten_call(mapping, idxs)
    assert fast == own
    assert all(type(i) is hybrid for i in fast)
    if not reverse:
        assert len(fast) == 200 * stride and fast[:stride] == [(idxs[0].idx * stride + k, idxs[0].root_idx)
                                                                 for k in range(stride)]
    else:
        assert {(i.idx, i.root_idx) for i in fast} == {(i.idx // stride, i.root_idx) for i in idxs}


class _TwoFlattens(nn.Module):
    """conv (1 -> 4) read by two flatten -> Linear heads: one removal maps through two flattens."""

    def __init__(self):
        super().__init__()
        self.conv, self.a, self.b = nn.Conv2d(1, 4, 3), nn.Linear(4 * 6 * 6, 2), nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.a(h.flatten(1)) + self.b(torch.flatten(h, 1))


def test_flatten_mappings_are_bounded_in_total_per_group(monkeypatch):
    """The bound is on all the flatten mappings of one group together (a MaxViT group made 78
    million index objects in 7,400 mappings, each under the bound alone), and it starts again at
    the next group."""
    model = _TwoFlattens()
    graph = tpc.new_graph().build_dependency(model, example_inputs=torch.randn(1, 1, 8, 8))
    group = graph.get_pruning_group(model.conv, tpc.CONV_PRUNER.prune_out_channels, idxs=[1, 2])
    for head in (model.a, model.b):  # Torch-Pruning's own group: 72 columns of each head
        cols = [idxs for dep, idxs in group.items if dep.target.module is head]
        assert sorted(int(i) for i in cols[0]) == list(range(36, 108))
    monkeypatch.setattr(tpc, "MAX_MAPPED_INDICES", 100)  # 72 per flatten passes, 144 in all does not
    with pytest.raises(tpc.GroupDoesNotSettle, match=r"mapped 144 indices .*MAX_MAPPED_INDICES = 100"):
        graph.get_pruning_group(model.conv, tpc.CONV_PRUNER.prune_out_channels, idxs=[1, 2])
    monkeypatch.setattr(tpc, "MAX_MAPPED_INDICES", 150)  # one channel: 36 per mapping, forward and back
    for channel in (3, 0):  # two groups in a row: more than 150 together, each under the bound
        group = graph.get_pruning_group(model.conv, tpc.CONV_PRUNER.prune_out_channels, idxs=[channel])
        cols = sorted(int(i) for dep, idxs in group.items if dep.target.module is model.b for i in idxs)
        assert cols == list(range(36 * channel, 36 * channel + 36))


def test_indexed_has_pruning_op_builds_the_groups_torch_pruning_builds(monkeypatch):
    """The lookup-table ``has_pruning_op`` gives the same pruning groups as Torch-Pruning's scan,
    on a ResNeXt block (grouped convolutions, a residual addition) and a torchvision ViT block."""
    from torchvision.models.resnet import Bottleneck
    from torchvision.models.vision_transformer import EncoderBlock

    def groups(model, x):
        graph = tpc.new_graph().build_dependency(model, example_inputs=x)
        out = []
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m in graph.module2node:
                fn = tpc.CONV_PRUNER.prune_out_channels if isinstance(m, nn.Conv2d) else tpc.prune_linear_out_channels
                g = graph.get_pruning_group(m, fn, idxs=[0, 2])
                out.append([(str(dep), sorted(int(i) for i in idxs)) for dep, idxs in g.items])
        return out

    torch.manual_seed(0)
    cases = [(nn.Sequential(nn.Conv2d(3, 32, 3), Bottleneck(32, 8, groups=4, base_width=32)), torch.randn(1, 3, 8, 8)),
             (EncoderBlock(4, 16, 32, 0.0, 0.0), torch.randn(1, 5, 16))]
    for model, x in cases:
        ours = groups(model.eval(), x)
        monkeypatch.setattr(tpc._Group, "has_pruning_op", tpc._has_pruning_op)
        theirs = groups(model, x)
        monkeypatch.setattr(tpc._Group, "has_pruning_op", tpc._indexed_has_pruning_op)
        assert ours == theirs and len(ours) >= 2
