"""The core (``bayesprune``) stands alone: torch, Torch-Pruning and numpy only.

The subprocess hides the harness's dependencies (an import of any of them raises ImportError, as
in an environment where they are not installed) and runs the whole user path on the core:
add_noise -> train -> prune -> shrink -> save/load -> ONNX-free export checks.
"""

import os
import subprocess
import sys
import textwrap

HIDDEN = ("torchvision", "scipy", "sklearn", "matplotlib", "tqdm", "PIL")

SCRIPT = textwrap.dedent(
    f"""
    import sys
    HIDDEN = {HIDDEN!r}
    for name in HIDDEN:
        sys.modules[name] = None  # "import name" now raises ImportError, find_spec says absent
    import torch
    from torch import nn
    import bayesprune as bp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 10))
    x = torch.randn(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    bp.add_noise(model, x[:2])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + bp.kl(model)
        loss.backward()
        opt.step()
    bp.prune(model, "etheta", threshold=0.9)
    model.eval()
    small = bp.shrink(model)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), rtol=1e-4, atol=1e-5)
    bp.save_shrunk(small, sys.argv[1])
    loaded = bp.load_shrunk(sys.argv[1], model=nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(),
                                                              nn.Linear(6 * 6 * 6, 10)))
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    loaded_names = sorted(m for m, mod in sys.modules.items()
                          if mod is not None and m.split(".")[0] in HIDDEN + ("bayesprune",))
    print("\\n".join(loaded_names))
    """
)


def test_core_imports_and_runs_without_the_harness_dependencies(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "small.pt")], capture_output=True,
                         text=True, timeout=240, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.split()
    assert not [m for m in loaded if m.split(".")[0] in HIDDEN], loaded
    assert "bayesprune" in loaded
    assert not [m for m in loaded if m.startswith("bayesprune.experiments")], loaded


def test_plain_import_of_the_core_loads_no_harness_module():
    """``import bayesprune`` loads no harness module and none of the harness's dependencies, and
    not Torch-Pruning either (held through ``_lazy.lazy_import``: its op counter imports timm
    when timm is installed, and timm imports torchvision). tqdm is the one exception, and it is
    torch's: ``import torch`` alone loads it (torch.hub), checked here too."""
    watched = ("bayesprune", "torch_pruning", "timm") + HIDDEN
    code = ("import sys; import torch; print('torch-loads-tqdm', 'tqdm' in sys.modules); import bayesprune; "
            "print('\\n'.join(m for m in sys.modules if m.split('.')[0] in " + repr(watched) + "))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    first, *names = out.stdout.split("\n")
    assert "bayesprune.noise" in names
    torch_loads_tqdm = first.endswith("True")
    allowed = {"tqdm"} if torch_loads_tqdm else set()
    assert not [m for m in names if m.startswith("bayesprune.experiments")
                or (m.split(".")[0] in ("torch_pruning", "timm") + HIDDEN and m.split(".")[0] not in allowed)], names


def test_timm_imported_after_the_core_leaves_the_lazy_torch_pruning_working():
    """timm's import walks ``sys.modules``; with an ``importlib.util.LazyLoader`` module there this
    started Torch-Pruning's import half-way and left ``bayesprune._torch_pruning`` without its
    attributes (shrink then failed with "has no attribute 'new_graph'"). The lazy module now
    stays out of ``sys.modules`` until first used."""
    code = textwrap.dedent("""
        import sys, torch
        import bayesprune as bp
        import timm
        assert "bayesprune._torch_pruning" not in sys.modules
        torch.manual_seed(0)
        model = timm.create_model("resnet18", num_classes=4).eval()
        for m in model.modules():  # BatchNorm statistics away from the identity
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1); m.running_var.uniform_(0.5, 2)
        x = torch.randn(2, 3, 32, 32)
        bp.add_noise(model, x)
        bp.prune(model, "snr", compression=0.3)
        model.eval()
        small = bp.shrink(model, x)
        with torch.no_grad():
            err = ((small(x) - model(x)).abs().max() / model(x).abs().max()).item()
        print(bp.count_parameters(small) < bp.count_parameters(model), err)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    smaller, err = out.stdout.split()
    assert smaller == "True" and float(err) < 1e-5, out.stdout


def test_core_runs_where_tqdm_is_not_installed(tmp_path):
    """``import torch`` loads tqdm only when it is installed (torch.hub); the core itself never
    imports it: with tqdm made unimportable, add_noise, prune and shrink run and tqdm is not loaded."""
    (tmp_path / "tqdm").mkdir()
    (tmp_path / "tqdm" / "__init__.py").write_text('raise ImportError("tqdm is not installed (simulated)")\n')
    code = textwrap.dedent("""
        import sys, torch
        import bayesprune as bp
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        x = torch.randn(2, 4)
        bp.add_noise(m, x)
        bp.prune(m, "bmrs_n")
        small = bp.shrink(m, x)
        print("tqdm-loaded", sys.modules.get("tqdm") is not None, bp.count_parameters(small) <= 58)
    """)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["False", "True"], out.stdout
