"""The model zoo: every model through add_noise -> train step -> prune -> shrink, one process each.

For each model (random weights; no download), at batch 2 on one thread:

1. ``add_noise(model, x)``: how many noise layers;
2. one training step (cross-entropy on random labels + KL) and an optimiser step (its state and
   the gradients then dropped, as before pruning);
3. prune: the posteriors of a random 40 % of every layer's structures are collapsed
   (mu = -19, log sigma = 0), BatchNorm running statistics randomised (not the identity), then
   ``prune(model, "etheta")``; the reported parameter count and the removal attempts shrink
   made inside it are kept;
4. ``shrink(model, x)``: seconds (prune's count already shrank and cached the network, so the
   prune column holds the removal's cost and this one a copy), parameters after, the relative error
   max|shrunk - masked| / max|masked| on the example and on another input; where that is above
   1e-5, the same for the prediction heads' outputs (a detector's detections are post-processing
   of them: NMS turns float rounding of near-tied scores into other boxes), marked "(heads)".

A model is ``ok`` when every stage passed and both errors (or both heads' errors) are <= 1e-5; ``count`` says whether
prune's reported parameter count equals the shrunk network's.  Each model runs in its own
subprocess with ``--timeout`` seconds; a failure prints the stage and the error's first line.

    python benchmarks/zoo.py                       # the default list (torchvision classification)
    python benchmarks/zoo.py --models tv:resnet18 timm:mobilenetv3_small_050 hf:bert
    python benchmarks/zoo.py --all-torchvision --timeout 150 --json zoo.json
    python benchmarks/zoo.py --everything --jobs 3 --timeout 150   # the table in docs/shrink.md

Names: ``tv:<torchvision classification model>``, ``tvdet:<detection model>`` (320 x 320 images,
``min_size=max_size=320``; the train step uses one random box per image), ``tvseg:<segmentation
model>`` (256 x 256), ``timm:<timm model>``, ``hf:<bert|distilbert|vit|gpt2|t5|llama|swin|convnext>``
(small configs built from ``transformers`` config classes).  ``--jobs N`` runs N models at once
(each still on one thread).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

DEFAULT = ["tv:resnet18", "tv:resnet50", "tv:mobilenet_v2", "tv:mobilenet_v3_small", "tv:efficientnet_b0",
           "tv:densenet121", "tv:regnet_x_400mf", "tv:resnext50_32x4d", "tv:shufflenet_v2_x1_0", "tv:squeezenet1_1",
           "tv:vgg11_bn", "tv:convnext_tiny", "tv:vit_b_16", "tv:swin_t", "tv:mnasnet0_5", "tv:googlenet"]
#: the detection and segmentation models Torch-Pruning's own benchmarks prune
DETECTION = ["tvdet:fasterrcnn_mobilenet_v3_large_fpn", "tvdet:fasterrcnn_mobilenet_v3_large_320_fpn",
             "tvdet:fasterrcnn_resnet50_fpn", "tvdet:retinanet_resnet50_fpn", "tvdet:fcos_resnet50_fpn",
             "tvdet:ssdlite320_mobilenet_v3_large", "tvdet:ssd300_vgg16", "tvdet:maskrcnn_resnet50_fpn",
             "tvdet:keypointrcnn_resnet50_fpn"]
SEGMENTATION = ["tvseg:fcn_resnet50", "tvseg:deeplabv3_resnet50", "tvseg:deeplabv3_mobilenet_v3_large",
                "tvseg:lraspp_mobilenet_v3_large"]
TIMM = ["timm:resnet50", "timm:efficientnet_b0", "timm:mobilenetv3_small_050", "timm:mobilenetv3_large_100",
        "timm:vit_small_patch16_224", "timm:deit_tiny_patch16_224", "timm:convnext_tiny", "timm:swin_tiny_patch4_window7_224",
        "timm:regnetx_002", "timm:resnext50_32x4d", "timm:densenet121", "timm:ghostnet_100"]
HF = ["hf:bert", "hf:distilbert", "hf:vit", "hf:swin", "hf:convnext", "hf:gpt2", "hf:t5", "hf:llama"]


def _hf(name: str):
    import torch
    import transformers as tf

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    if name == "bert":
        m = tf.BertModel(tf.BertConfig(vocab_size=100, **small))
    elif name == "distilbert":
        m = tf.DistilBertModel(tf.DistilBertConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, hidden_dim=128))
    elif name == "gpt2":
        m = tf.GPT2Model(tf.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, use_cache=False))
    elif name == "t5":
        m = tf.T5EncoderModel(tf.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                          use_cache=False))
    elif name == "llama":
        m = tf.LlamaModel(tf.LlamaConfig(vocab_size=100, num_key_value_heads=2, use_cache=False, **small))
    elif name == "vit":
        m = tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, **small))
        return m, torch.randn(2, 3, 32, 32)
    elif name == "swin":
        m = tf.SwinModel(tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                       window_size=4))
        return m, torch.randn(2, 3, 32, 32)
    elif name == "convnext":
        m = tf.ConvNextModel(tf.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], image_size=32))
        return m, torch.randn(2, 3, 32, 32)
    else:
        raise ValueError(f"unknown hf model {name!r}")
    return m, torch.randint(0, 100, (2, 16))


def build(name: str):
    """``(model, example input)`` with random weights, zero-initialised layers re-drawn (see
    :func:`_redraw_zero_layers`)."""
    model, x = _build(name)
    _redraw_zero_layers(model)
    return model, x


def _redraw_zero_layers(model) -> list[str]:
    """Re-draw the weights of Linear/Conv layers initialised to zero (torchvision's ViT and
    MaxViT heads, some residual branches): with them the model's outputs are all zero whatever
    the pruning, and the zoo's comparison of shrunk against masked outputs would compare nothing
    (its relative error 0).  N(0, 0.02^2), a ViT's initialisation; returns the layers' names."""
    import torch

    names = []
    with torch.no_grad():
        for name, m in model.named_modules():
            w = getattr(m, "weight", None)
            if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) and w is not None and not bool(w.any()):
                w.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(len(names)))
                names.append(name)
    return names


def _build(name: str):
    import torch

    if name.startswith("tv:"):
        import torchvision

        tv = name[3:]
        size = 299 if tv.startswith("inception") else 224
        kwargs = {"aux_logits": False, "init_weights": False} if tv in ("googlenet", "inception_v3") else {}
        return torchvision.models.get_model(tv, weights=None, **kwargs), torch.randn(2, 3, size, size)
    if name.startswith("tvdet:"):
        import torchvision

        kwargs = {"weights_backbone": None, "min_size": 320, "max_size": 320}
        if name.startswith("tvdet:ssd"):
            kwargs = {"weights_backbone": None}
        m = torchvision.models.get_model(name[6:], weights=None, **kwargs)
        g = torch.Generator().manual_seed(0)
        return m, ([torch.rand(3, 320, 320, generator=g) for _ in range(2)],)
    if name.startswith("tvseg:"):
        import torchvision

        m = torchvision.models.get_model(name[6:], weights=None, weights_backbone=None, aux_loss=False)
        return m, torch.randn(2, 3, 256, 256)
    if name.startswith("timm:"):
        import timm

        m = timm.create_model(name[5:], pretrained=False)
        size = m.default_cfg.get("input_size", (3, 224, 224))
        return m, torch.randn(2, *size)
    if name.startswith("hf:"):
        return _hf(name[3:])
    raise ValueError(f"model names start with tv:, timm: or hf:, got {name!r}")


def _main_output(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, list) and out and isinstance(out[0], dict):  # a detector's per-image dicts
        return torch.cat([v.flatten().double() for d in out for v in d.values() if v.is_floating_point()])
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, dict):
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    if isinstance(out, (tuple, list)):
        return _main_output(out[0])
    raise TypeError(f"cannot find a tensor in the output ({type(out).__name__})")


@contextlib.contextmanager
def _counting_removal_attempts():
    """A list that gets one entry per removal shrink tries (each copies the network, builds
    Torch-Pruning's graph and removes; the twin with random BatchNorm statistics counts too)."""
    from bayesprune import removal

    attempts, real = [], removal._remove_structures

    def counted(*args, **kwargs):
        attempts.append(1)
        return real(*args, **kwargs)

    removal._remove_structures = counted
    try:
        yield attempts
    finally:
        removal._remove_structures = real


def run_one(name: str) -> dict:
    """All stages for one model; returns the row (raises nothing: errors go into the row)."""
    import torch

    import bayesprune as bp

    torch.set_num_threads(1)
    torch.manual_seed(0)
    row = {"model": name, "stage": "build"}
    try:
        model, x = build(name)
        row["params_before"] = bp.count_parameters(model)
        row["stage"] = "add_noise"
        bp.add_noise(model, x)
        row["noise_layers"] = len(bp.noise_layers(model))
        row["stage"] = "train_step"
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        if name.startswith("tvdet:"):  # a detector's training forward takes targets, returns losses
            keys = ["boxes", "labels"] + (["masks"] if "mask" in name else []) + (["keypoints"] if "keypoint" in name else [])
            target = {"boxes": torch.tensor([[10.0, 20.0, 200.0, 220.0]]), "labels": torch.tensor([1]),
                      "masks": torch.zeros(1, 320, 320, dtype=torch.uint8), "keypoints": torch.ones(1, 17, 3) * 50}
            losses = model(x[0], [{k: target[k] for k in keys} for _ in x[0]])
            loss = sum(losses.values()) + bp.kl(model)
        else:
            loss = _main_output(model(x)).float().pow(2).mean() + bp.kl(model)
        loss.backward()
        opt.step()
        del opt, loss  # the optimizer's state and the gradients are not prune's: a 644 M-parameter
        model.zero_grad(set_to_none=True)  # RegNet's Adam state alone is 5.2 GB
        row["stage"] = "prune"
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n in bp.noise_layers(model):
                k = int(0.4 * n.mu.numel())
                idx = torch.randperm(n.mu.numel(), generator=g)[:k]
                n.mu[idx] = -19.0
                n.log_sigma[idx] = 0.0
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                    m.running_mean.normal_(0, 0.5, generator=g)
                    m.running_var.uniform_(0.5, 2.0, generator=g)
        model.eval()
        t = time.perf_counter()
        with _counting_removal_attempts() as attempts:
            rep = bp.prune(model, "etheta")  # counts the shrunk network: shrinks (and caches it)
        row["prune_s"] = time.perf_counter() - t
        row["removal_attempts"] = len(attempts)
        row["params_reported"] = rep.params_kept
        row["stage"] = "shrink"
        t = time.perf_counter()
        small = bp.shrink(model, x)
        row["shrink_s"] = time.perf_counter() - t
        row["params_after"] = bp.count_parameters(small)
        row["kept_layers"] = len(getattr(small, "bayesprune_kept", {}))
        empty = False  # a detector with random weights detects nothing: its outputs compare nothing
        with torch.no_grad():
            for key, inp in (("rel_err", x), ("rel_err_other", _other_input(x))):
                call = (lambda m: m(*inp)) if isinstance(inp, tuple) else (lambda m: m(inp))
                a, b = _main_output(call(model)).double(), _main_output(call(small)).double()
                if a.shape != b.shape:
                    raise RuntimeError(f"output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
                empty |= not a.numel()
                row[key] = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) if a.numel() else 0.0
        if empty or max(row["rel_err"], row["rel_err_other"]) > 1e-5:  # post-processing (NMS)? the heads
            _head_errors(row, model, small, x, empty)
        row["stage"] = "done"
    except Exception as e:  # a benchmark row, not a crash: say which stage and why
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    # both counts made and equal (a row that stopped before them says "no", not None == None)
    row["count_ok"] = row.get("params_reported") is not None and row.get("params_reported") == row.get("params_after")
    row["ok"] = is_ok(row)
    return row


def is_ok(row: dict) -> bool:
    """Every stage done and the shrunk network equal to the masked one to 1e-5 on both inputs:
    on the prediction heads' outputs where the row has them (the model outputs were
    post-processing that differs, or held nothing: a detector without detections)."""
    errors = ("heads_rel_err", "heads_rel_err_other") if "heads_rel_err" in row else ("rel_err", "rel_err_other")
    return row["stage"] == "done" and max(row.get(k, 1) for k in errors) <= 1e-5


def _head_errors(row: dict, model, small, x, empty: bool = False) -> None:
    """The relative errors of the prediction heads' outputs (what shrink verifies when the model
    output is post-processing of them, as a detector's NMS), as ``heads_rel_err[_other]``;
    ``empty``: the model output holds nothing to compare (no detections)."""
    from bayesprune.removal import _head_outputs, _prediction_heads, _ProbeList, _relative_difference

    heads = _prediction_heads(model, x)
    if not heads:
        return
    two_stage = hasattr(model, "rpn") and hasattr(model, "roi_heads")
    for key, inp in (("heads_rel_err", x), ("heads_rel_err_other", _other_input(x))):
        inputs = _ProbeList([inp])
        with _same_proposals(model, small) if two_stage else contextlib.nullcontext():
            row[key] = _relative_difference(_head_outputs(model, inputs, heads), _head_outputs(small, inputs, heads))
    if empty:
        row["error"] = (f"no detections to compare (random weights): the {len(heads)} prediction heads' outputs "
                        "compared instead" + (", the box heads on the masked model's proposals" if two_stage else ""))
    else:
        row["error"] = (f"model outputs differ by up to {max(row['rel_err'], row['rel_err_other']):.2g} (post-processing "
                        f"of the {len(heads)} prediction heads' outputs, whose errors are given)")


@contextlib.contextmanager
def _same_proposals(model, small):
    """A two-stage detector's box heads read the proposals its RPN selects by top-k and NMS, where
    float rounding of near-tied random scores picks other boxes: while active, the shrunk
    network's RPN returns the proposals the masked model's RPN returned last (its own RPN head
    still runs and is compared), so both box heads read the same regions."""
    seen = {}
    handles = [model.rpn.register_forward_hook(lambda mod, args, out: seen.__setitem__("out", out)),
               small.rpn.register_forward_hook(lambda mod, args, out: seen.get("out", out))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _other_input(x):
    import torch

    g = torch.Generator().manual_seed(7)
    if isinstance(x, tuple):  # a detector's list of images
        return ([torch.rand(i.shape, generator=g) for i in x[0]],)
    if x.is_floating_point():
        return torch.randn(x.shape, generator=g)
    return torch.randint(0, 100, x.shape, generator=g)


STAGES = ["add_noise", "train_step", "prune", "shrink"]


def _stage_marks(row: dict) -> str:
    """ok / FAIL / - per stage (add_noise, train step, prune, shrink and its check)."""
    if row["stage"] == "done":
        return " | ".join(["ok"] * 3 + ["ok" if row["ok"] else "inexact"])
    at = STAGES.index(row["stage"]) if row["stage"] in STAGES else (-1 if row["stage"] == "build" else None)
    if at is None:  # timeout or a crashed process: the stage is not known
        return " | ".join([row["stage"]] * len(STAGES))
    return " | ".join("ok" if i < at else "FAIL" if i == at else "-" for i in range(len(STAGES)))


def _err(row: dict, key: str) -> str:
    if "heads_" + key in row:
        return f"{row['heads_' + key]:.1e} (heads)"
    return f"{row[key]:.1e}" if key in row else "-"


def _fmt(row: dict) -> str:
    def g(k, f="{}"):
        return f.format(row[k]) if k in row else "-"

    err = row.get("error", "")
    return (f"| {row['model']} | {g('noise_layers')} | {_stage_marks(row)} | "
            f"{_err(row, 'rel_err')} | {_err(row, 'rel_err_other')} | {g('params_before', '{:,}')} | "
            f"{g('params_reported', '{:,}')} | {g('params_after', '{:,}')} | {'yes' if row['count_ok'] else 'no'} | "
            f"{g('prune_s', '{:.1f}')} | {g('removal_attempts')} | {g('shrink_s', '{:.1f}')} | {g('kept_layers')} | {err} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--all-torchvision", action="store_true", help="every torchvision classification model")
    p.add_argument("--everything", action="store_true",
                   help="the models of the issue first (DEFAULT, timm, Hugging Face), then detection, segmentation "
                        "and every other torchvision classification model")
    p.add_argument("--jobs", type=int, default=1, help="models run at once (default 1)")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds per model (default 150)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one model, print its row
    args = p.parse_args(argv)
    if args.one:
        print("ZOO-ROW " + json.dumps(run_one(args.one)))
        return 0
    models = args.models or DEFAULT
    if args.all_torchvision:
        import torchvision

        models = [f"tv:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    if args.everything:
        import torchvision

        rest = [f"tv:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
        models = list(dict.fromkeys(DEFAULT + HF + TIMM + DETECTION + SEGMENTATION + rest))
    print(f"load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f} at start", flush=True)
    print("| model | noise layers | add_noise | train step | prune | shrink (= masked) | rel err (example) | rel err (other input) | params before | "
          "params reported | params after shrink | count = shrunk | prune s | removal attempts | shrink s | layers kept (inexact) | error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done, lock = [], threading.Lock()

    def one(name):
        t = time.perf_counter()
        try:
            out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                                 timeout=args.timeout, env=env)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("ZOO-ROW ")), None)
            row = json.loads(line[8:]) if line else {
                "model": name, "stage": "process", "ok": False, "count_ok": False,
                "error": (out.stderr.strip().splitlines() or ["no output"])[-1][:160]}
        except subprocess.TimeoutExpired:
            row = {"model": name, "stage": "timeout", "ok": False, "count_ok": False,
                   "error": f"over {args.timeout:g} s"}
        row["wall_s"] = time.perf_counter() - t
        print(_fmt(row), flush=True)
        if args.json:  # after every model: an interrupted run keeps the rows it has
            with lock:
                done.append(row)
                _write_json(args.json, done)
        return row

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(one, models))
    ok = sum(r["ok"] for r in rows)
    per_stage = {s: sum(1 for r in rows if r["stage"] == "done" or (r["stage"] in STAGES and STAGES.index(r["stage"]) > i))
                 for i, s in enumerate(STAGES[:-1])}
    slow = [r["model"] for r in rows if r.get("prune_s", 0) + r.get("shrink_s", 0) > 60]
    print(f"\n{ok} of {len(rows)} models ok (shrunk = masked to 1e-5 on two inputs); passed add_noise "
          f"{per_stage['add_noise']}, the train step {per_stage['train_step']}, prune {per_stage['prune']}; "
          f"parameter count equal to the shrunk network's on {sum(r['count_ok'] for r in rows)}; "
          f"timeouts {sum(r['stage'] == 'timeout' for r in rows)}; prune + shrink over 60 s: {', '.join(slow) or 'none'}")
    print(f"load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f} at the end")
    if args.json:
        _write_json(args.json, rows)  # in the list's order
    return 0


def _write_json(path: str, rows: list) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
