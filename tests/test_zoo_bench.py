"""benchmarks/zoo.py: a model through every stage, its row, the table and the JSON written as it goes."""

import json

from benchmark_module import load_benchmark

zoo = load_benchmark("zoo")


def test_zoo_row_and_json(tmp_path, capsys):
    out = tmp_path / "zoo.json"
    assert zoo.main(["--models", "tv:squeezenet1_1", "hf:nosuchmodel", "--timeout", "120", "--json", str(out)]) == 0
    rows = {r["model"]: r for r in json.loads(out.read_text())}
    sq = rows["tv:squeezenet1_1"]
    assert sq["ok"] and sq["count_ok"] and sq["stage"] == "done"
    assert sq["params_after"] == sq["params_reported"] < sq["params_before"] == 1_235_496
    assert max(sq["rel_err"], sq["rel_err_other"]) <= 1e-5
    assert sq["removal_attempts"] == 1  # exact at the first removal (no BatchNorm, so no twin to check)
    bad = rows["hf:nosuchmodel"]
    assert not bad["ok"] and bad["stage"] == "build" and "nosuchmodel" in bad["error"]
    assert not bad["count_ok"]  # no count made: not "equal" (tv:regnet_y_128gf read "yes" after prune ran out of memory)
    printed = capsys.readouterr().out
    assert "| tv:squeezenet1_1 | 25 | ok | ok | ok | ok |" in printed
    assert "| removal attempts |" in printed.splitlines()[1]
    assert "1 of 2 models ok" in printed


def test_a_row_with_head_errors_is_judged_on_them():
    """Equal (empty) model outputs do not make a row ok when its prediction heads differ."""
    row = {"stage": "done", "rel_err": 0.0, "rel_err_other": 0.0}
    assert zoo.is_ok(row)
    assert not zoo.is_ok({**row, "heads_rel_err": 3e-3, "heads_rel_err_other": 1e-7})
    assert zoo.is_ok({**row, "rel_err": 0.4, "heads_rel_err": 2e-7, "heads_rel_err_other": 1e-7})
    assert not zoo.is_ok({**row, "stage": "shrink"})


def test_zero_initialised_layers_are_redrawn_so_outputs_compare_something():
    """torchvision's ViT zero-initialises its head: its outputs are all zero, and shrunk vs masked
    compared nothing (tv:vit_h_14 relative error 0.0e+00).  The zoo re-draws such layers; others
    keep their weights."""
    import torch

    vit, x = zoo.build("tv:vit_b_32")
    assert vit.heads.head.weight.std() > 0.01
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    torch.nn.init.zeros_(model[1].weight)
    kept = model[0].weight.clone()
    assert zoo._redraw_zero_layers(model) == ["1"]
    assert torch.equal(model[0].weight, kept) and bool(model[1].weight.ne(0).all())
    with torch.no_grad():
        assert bool(vit.eval()(x[:1]).ne(0).any())


def test_same_proposals_gives_the_shrunk_rpn_the_masked_models_output():
    """Two-stage detectors: while active, the shrunk model's RPN returns what the masked model's
    RPN returned last (its own computation still runs), and nothing is left hooked after."""
    import torch
    from torch import nn

    class Detector(nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.rpn, self.roi_heads = nn.Linear(2, 2), nn.Identity()
            with torch.no_grad():
                self.rpn.weight.copy_(torch.eye(2))
                self.rpn.bias.fill_(shift)

        def forward(self, x):
            return self.roi_heads(self.rpn(x))

    masked, small, x = Detector(0.0), Detector(1.0), torch.ones(1, 2)
    with zoo._same_proposals(masked, small):
        assert torch.equal(masked(x), x)
        assert torch.equal(small(x), x)  # the masked model's proposals, not its own (x + 1)
    assert torch.equal(small(x), x + 1)
    assert not small.rpn._forward_hooks and not masked.rpn._forward_hooks
