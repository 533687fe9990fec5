"""scripts/lenet5_frontier.py: its networks are the paper's LeNet5 with the widths given."""
import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

from bayesprune.experiments.models import LeNet5

_spec = importlib.util.spec_from_file_location("lenet5_frontier", Path(__file__).parents[1] / "scripts" / "lenet5_frontier.py")
frontier = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(frontier)


def _count(net):
    return sum(p.numel() for p in net.parameters())


def test_full_widths_are_the_papers_lenet5():
    full = frontier.lenet5_shape(6, 16, 120, 84)
    ref = LeNet5(1, 10, 32)
    assert _count(full) == _count(ref) == frontier.LENET5_PARAMETERS
    assert [tuple(p.shape) for p in full.parameters()] == [tuple(p.shape) for p in ref.parameters()]
    full.load_state_dict(dict(zip(full.state_dict(), ref.state_dict().values())))
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(full(x), ref(x))


@pytest.mark.parametrize("k,m,a,b", [(1, 3, 18, 9), (3, 6, 14, 14)])
def test_narrow_widths_count_as_the_pruned_network(k, m, a, b):
    # conv1 k filters (25 + 1 each), conv2 m (25 k + 1), fc1 a (25 m + 1), fc2 b (a + 1), output 10 (b + 1)
    assert _count(frontier.lenet5_shape(k, m, a, b)) == 26 * k + (25 * k + 1) * m + (25 * m + 1) * a + (a + 1) * b + (b + 1) * 10


def test_bad_shapes_are_named():
    for text in ("3,6,14", "3,6,0,2", "a,b,c,d"):
        with pytest.raises(argparse.ArgumentTypeError, match="conv1,conv2,fc1,fc2"):
            frontier._shape(text)
