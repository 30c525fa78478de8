"""Real-size models: peering against Captum and the floor, each in its own process for its peak memory.

    .venv/bin/python benchmarks/bench_real_size.py                     # the README's table (~15 min idle)
    .venv/bin/python benchmarks/bench_real_size.py --models resnet50 --methods ig --images 4 --steps 16

Models are built from their configs with random weights (cost does not depend on training; nothing is
downloaded): a ResNet-50 (``ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
layer_type="bottleneck")``) and a ViT-B/16 (``ViTConfig()``) on RGB images of 224 px (1,000 classes), and a
BERT base
(``BertConfig()``, 2 classes) on 128 tokens with padded attention masks, explained at its word embeddings.
Every method differentiates the softmax probability of each sample's top-2 classes.

- ``ig``: integrated gradients, ``--steps`` midpoints from a black image (BERT: from the embeddings of
  ``[PAD]`` tokens). Captum: ``IntegratedGradients`` (BERT: ``LayerIntegratedGradients`` at the word
  embeddings, the same baseline) with ``internal_batch_size=8``, once per class.
- ``smoothgrad``: ``--steps`` noisy copies, sigma 0.15 of the value range. Captum: ``NoiseTunnel(Saliency)``
  (BERT: on ``inputs_embeds``, where Captum can add noise), ``nt_samples_batch_size`` making 8 points per
  pass, once per class.
- ``gradient``: plain top-2 gradients; the floor is one forward pass of the batch and two backward passes
  through the retained graph.
- ``morph``: ``--steps`` morph steps (``early_stop=False``, so every step runs); the floor is one forward
  and one backward pass of the same batch per step (and the final forward pass).

The floor of ``ig`` and ``smoothgrad``: per chunk of 8 points one forward and two backward passes
through the retained graph, plus the forward pass that picks the top-2 classes. Each contender runs in a
fresh process (model built with the same seed, one warm-up forward + backward of one point, then timed
``--repeats`` times); peak memory is that process's ``ru_maxrss`` and "extra" is the peak minus the
resident memory before the timed runs (the model and libraries). Rounds alternate the contenders' order.
Times are the process's CPU seconds (all threads; OpenMP waits passively), the steadier figure on a shared
machine, and wall seconds in parentheses.
peering runs with ``--budget`` ("captum": Captum's measured extra memory, so the time is compared at no
more memory; "default": peering's default budget; or a size such as "1GiB"). The exactness check comes
first: peering against plain autograd (gradients, SmoothGrad with the same noise) and against Captum
(integrated gradients).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

K = 2
CAPTUM_POINTS = 8  # Captum's internal_batch_size, and the floor's chunk
NOISE = 0.15


def build(name: str, images: int) -> dict[str, Any]:
    """The model, its inputs and how to call it; the same seed everywhere."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if name == "bert":
        config = transformers.BertConfig(num_labels=2)
        model = transformers.BertForSequenceClassification(config).eval()
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(1000, config.vocab_size, (images, 128), generator=generator)
        ids[:, 0] = 101  # [CLS]
        mask = torch.ones(images, 128, dtype=torch.long)
        for i in range(images):  # padded sentences of several lengths
            mask[i, 128 - 24 * (i % 4) :] = 0
        base_ids = torch.zeros_like(ids)  # [PAD]
        base_ids[:, 0] = 101
        embed = model.bert.embeddings.word_embeddings
        with torch.no_grad():
            baseline = embed(base_ids)
        return {"model": model, "inputs": ids, "kwargs": {"attention_mask": mask}, "layer": embed,
                "baseline": baseline, "base_ids": base_ids}
    if name == "resnet50":
        config = transformers.ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                                           layer_type="bottleneck", num_labels=1000)
        model = transformers.ResNetForImageClassification(config).eval()
    elif name == "vit":
        model = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000)).eval()
    else:
        raise ValueError(name)
    x = torch.rand(images, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return {"model": model, "inputs": x, "kwargs": {}, "layer": None, "baseline": 0.0}


def logits(out: Any) -> torch.Tensor:
    return out.logits


class Probabilities(torch.nn.Module):
    """The model as Captum and the floor call it: points (images, or BERT's input embeddings) to
    softmax probabilities [N, C]."""

    def __init__(self, setup: dict[str, Any]) -> None:
        super().__init__()
        self.model, self.text = setup["model"], setup["layer"] is not None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.text:
            return self.model(inputs_embeds=x, attention_mask=mask).logits.softmax(-1)
        return self.model(x).logits.softmax(-1)


def layer_points(setup: dict[str, Any]) -> torch.Tensor:
    """What is explained: the images, or BERT's word embeddings of the ids."""
    if setup["layer"] is None:
        return setup["inputs"]
    with torch.no_grad():
        return setup["layer"](setup["inputs"])


def noise_sigma(points: torch.Tensor) -> torch.Tensor:
    flat = points.flatten(1)
    return NOISE * (flat.amax(1) - flat.amin(1))


def peering_noise(points: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """SmoothGrad's noisy copies exactly as peering draws them: [count, B, ...]."""
    generator = torch.Generator().manual_seed(seed)
    sigma = noise_sigma(points).view(-1, *([1] * (points.ndim - 1)))
    noise = torch.stack([torch.randn(points.shape, generator=generator) for _ in range(count)])
    return points + sigma * noise


def path(points: torch.Tensor, baseline: Any, steps: int) -> torch.Tensor:
    base = torch.broadcast_to(torch.as_tensor(baseline, dtype=points.dtype), points.shape)
    alphas = (torch.arange(steps, dtype=points.dtype) + 0.5) / steps
    return base + alphas.view(-1, *([1] * points.ndim)) * (points - base)


# ---- the contenders ---------------------------------------------------------------------------------


def run_peering(setup: dict[str, Any], method: str, steps: int, budget: Any) -> Callable[[], Any]:
    import peering

    model, x, kw, layer = setup["model"], setup["inputs"], setup["kwargs"], setup["layer"]
    common = {"top_k": K, "output_fn": logits, "forward_kwargs": kw or None, "layer": layer}
    if budget is not None:  # an older peering (--before) has no memory_budget
        common["memory_budget"] = budget
    if method == "ig":
        return lambda: peering.explain(model, x, method="integrated_gradients", steps=steps,
                                       baseline=setup["baseline"], **common)
    if method == "smoothgrad":
        return lambda: peering.explain(model, x, method="smoothgrad", n_samples=steps, noise_level=NOISE,
                                       **common)
    if method == "gradient":
        return lambda: peering.explain(model, x, method="gradient", **common)
    if method == "morph":
        extra = {"memory_budget": budget} if budget is not None else {}
        if layer is not None:  # text: morph the input embeddings
            embeds, wrapped = layer_points(setup), Probabilities(setup)
            return lambda: peering.morph(_LogOf(wrapped), embeds, 1, steps=steps, confidence=None,
                                         early_stop=False, bounds=None, smoothing=0,
                                         forward_kwargs={"mask": kw["attention_mask"]}, **extra)
        return lambda: peering.morph(model, x, 3, steps=steps, confidence=None, early_stop=False,
                                     output_fn=logits, **extra)
    raise ValueError(method)


class _LogOf(torch.nn.Module):
    """Probabilities back to logits (log-probabilities) for morph, which takes class scores."""

    def __init__(self, probs: torch.nn.Module) -> None:
        super().__init__()
        self.probs = probs

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.probs(x, mask).log()


def run_captum(setup: dict[str, Any], method: str, steps: int) -> Callable[[], Any]:
    from captum.attr import IntegratedGradients, LayerIntegratedGradients, NoiseTunnel, Saliency

    model, x, kw, layer = setup["model"], setup["inputs"], setup["kwargs"], setup["layer"]
    probs = Probabilities(setup)
    b = x.shape[0]

    def targets() -> torch.Tensor:  # the top-2 classes: Captum needs them given
        with torch.no_grad():
            return model(x, **kw).logits.topk(K, dim=1).indices

    if method == "ig" and layer is not None:
        def ids_probs(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return model(ids, attention_mask=mask).logits.softmax(-1)

        lig = LayerIntegratedGradients(ids_probs, layer)

        def captum_lig() -> list[torch.Tensor]:
            t = targets()
            return [lig.attribute(x, baselines=setup["base_ids"], target=t[:, k], n_steps=steps,
                                  method="riemann_middle", additional_forward_args=(kw["attention_mask"],),
                                  internal_batch_size=CAPTUM_POINTS) for k in range(K)]

        return captum_lig
    if method == "ig":
        ig = IntegratedGradients(probs)

        def captum_ig() -> list[torch.Tensor]:
            t = targets()
            return [ig.attribute(x, baselines=0.0, target=t[:, k], n_steps=steps, method="riemann_middle",
                                 internal_batch_size=CAPTUM_POINTS) for k in range(K)]

        return captum_ig
    if method == "smoothgrad":
        tunnel = NoiseTunnel(Saliency(probs))
        points = layer_points(setup)
        extra = (kw["attention_mask"],) if layer is not None else None

        def captum_smoothgrad() -> list[torch.Tensor]:
            t = targets()
            sigma = float(noise_sigma(points).mean())
            return [tunnel.attribute(points, nt_type="smoothgrad", nt_samples=steps, stdevs=sigma,
                                     nt_samples_batch_size=max(1, CAPTUM_POINTS // b), target=t[:, k],
                                     abs=False, additional_forward_args=extra) for k in range(K)]

        return captum_smoothgrad
    raise ValueError(f"no Captum contender for {method}")


def run_floor(setup: dict[str, Any], method: str, steps: int) -> Callable[[], Any]:
    """The least autograd work: one forward per point, K backward passes through the retained graph."""
    probs = Probabilities(setup)
    model, kw = setup["model"], setup["kwargs"]
    mask = kw.get("attention_mask")
    points = layer_points(setup)
    b = points.shape[0]

    def grads_of(x: torch.Tensor, m: torch.Tensor | None, t: torch.Tensor | None) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        p = probs(x, m)
        t = p.detach().topk(K, dim=1).indices if t is None else t
        sel = p.gather(1, t)
        return torch.stack([torch.autograd.grad(sel[:, k].sum(), x, retain_graph=k < K - 1)[0]
                            for k in range(K)], 1)

    if method == "gradient":
        return lambda: grads_of(points, mask, None)
    if method == "morph":
        def morph_floor() -> torch.Tensor:
            x = points.clone()
            for _ in range(steps):
                xi = x.requires_grad_(True)
                (g,) = torch.autograd.grad(probs(xi, mask)[:, 1].log().sum(), xi)
                x = (xi.detach() + 0.01 * g.sign())
            with torch.no_grad():
                return probs(x, mask)
        return morph_floor

    def over_points(make: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def floor() -> torch.Tensor:
            with torch.no_grad():
                t = model(setup["inputs"], **kw).logits.topk(K, dim=1).indices
            flat = make().flatten(0, 1)
            total = torch.zeros((b, K, *points.shape[1:]))
            for start in range(0, flat.shape[0], CAPTUM_POINTS):
                rows = torch.arange(start, min(start + CAPTUM_POINTS, flat.shape[0])) % b
                m = None if mask is None else mask[rows]
                g = grads_of(flat[start : start + CAPTUM_POINTS], m, t[rows])
                total.index_add_(0, rows, g)
            return total / steps
        return floor

    if method == "ig":
        return over_points(lambda: path(points, setup["baseline"], steps))
    if method == "smoothgrad":
        return over_points(lambda: peering_noise(points, steps))
    raise ValueError(method)


# ---- the exactness check ----------------------------------------------------------------------------


def check(name: str) -> dict[str, float]:
    """Max abs differences on 2 samples: peering vs plain autograd (gradient; SmoothGrad with the same
    noise) and vs Captum (integrated gradients, 4 steps)."""
    from torch.testing import assert_close

    import peering

    setup = build(name, 2)
    model, kw, layer = setup["model"], setup["kwargs"], setup["layer"]
    common = {"top_k": K, "output_fn": logits, "forward_kwargs": kw or None, "layer": layer}
    floor = {m: run_floor(setup, m, 4)() for m in ("gradient", "smoothgrad")}
    out: dict[str, float] = {}
    for method, options in (("gradient", {}), ("smoothgrad", {"n_samples": 4, "noise_level": NOISE})):
        exp = peering.explain(model, setup["inputs"], method=method, **common, **options)
        assert_close(exp.attributions, floor[method], rtol=1e-4, atol=1e-6)
        out[method] = float((exp.attributions - floor[method]).abs().max())
    exp = peering.explain(model, setup["inputs"], method="integrated_gradients", steps=4,
                          baseline=setup["baseline"], **common)
    captum = torch.stack(run_captum(setup, "ig", 4)(), 1)
    assert_close(exp.attributions, captum, rtol=1e-4, atol=1e-6)
    out["ig vs Captum"] = float((exp.attributions - captum).abs().max())
    out["scale"] = float(captum.abs().max())
    return out


# ---- processes --------------------------------------------------------------------------------------


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    if spec["contender"] == "check":
        return check(spec["model"])
    setup = build(spec["model"], spec["images"])
    fn = {"peering": lambda: run_peering(setup, spec["method"], spec["steps"], spec["budget"]),
          "captum": lambda: run_captum(setup, spec["method"], spec["steps"]),
          "floor": lambda: run_floor(setup, spec["method"], spec["steps"])}[spec["contender"]]()
    probs = Probabilities(setup)  # warm-up: one forward + backward of one point
    x = layer_points(setup)[:1].detach().clone().requires_grad_(True)
    mask = setup["kwargs"].get("attention_mask")
    probs(x, None if mask is None else mask[:1])[:, 0].sum().backward()
    setup["model"].zero_grad(set_to_none=True)
    del x
    gc.collect()
    base = rss()
    times, cpu = [], []
    for _ in range(spec["repeats"]):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"times": times, "cpu": cpu, "base": base,
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def spawn(spec: dict[str, Any], src: str | None = None) -> dict[str, Any]:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads make busy-machine runs meaningless
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,vit,bert")
    parser.add_argument("--methods", default="ig,smoothgrad,gradient,morph")
    parser.add_argument("--images", type=int, default=2, help="samples per batch")
    parser.add_argument("--steps", type=int, default=8, help="IG steps, SmoothGrad draws, morph steps")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of all contenders, order flipped")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs in each contender's process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", default="captum",
                        help="peering's memory_budget: captum, default, or a size")
    parser.add_argument("--before", default=None, help="a src/ folder of an older peering to time too")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    models, methods = args.models.split(","), args.methods.split(",")
    common = {"images": args.images, "steps": args.steps, "repeats": args.repeats, "threads": args.threads}

    if not args.skip_check:  # exactness first: a fast wrong answer is no answer
        for name in models:
            diffs = spawn({"contender": "check", "model": name, **common})
            scale = diffs.pop("scale")
            print(f"exact: {name}: max abs diff " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
                  + f" (attributions up to {scale:.1e})", flush=True)

    rows = []
    for name in models:
        for method in methods:
            contenders = ["peering", "floor"]
            if method in ("ig", "smoothgrad"):
                contenders.insert(0, "captum")
            if args.before:
                contenders.append("before")
            results: dict[str, list[dict[str, Any]]] = {c: [] for c in contenders}
            for r in range(args.rounds):
                order = contenders if r % 2 == 0 else contenders[::-1]
                if "captum" in order:  # Captum first: its memory may be peering's budget
                    order = ["captum"] + [c for c in order if c != "captum"]
                for c in order:
                    spec = {"contender": "peering" if c == "before" else c, "model": name, "method": method,
                            **common}
                    budget = None if args.budget == "default" else args.budget
                    if c == "before":
                        budget = None
                    elif args.budget == "captum":
                        budget = (int(statistics.median(x["peak"] - x["base"] for x in results["captum"]))
                                  if results.get("captum") else None)
                    spec["budget"] = budget
                    results[c].append(spawn(spec, args.before if c == "before" else None))
                    last = results[c][-1]
                    print(f"  {name} {method} {c}: {statistics.median(last['times']):.2f} s "
                          f"({statistics.median(last['cpu']):.2f} s CPU), peak "
                          f"{gib(last['peak'])} GiB, extra {gib(last['peak'] - last['base'])} GiB",
                          flush=True)
            summary = {c: (statistics.median(t for x in v for t in x["cpu"]),
                           statistics.median(t for x in v for t in x["times"]),
                           max(x["peak"] for x in v), max(x["peak"] - x["base"] for x in v))
                       for c, v in results.items()}
            rows.append((name, method, summary))

    print(f"\n{args.images} samples, {args.steps} steps/draws, top-{K}, {args.threads} threads, peering's "
          f"budget: {args.budget}, {args.rounds} round(s) of {args.repeats} run(s). Each cell: CPU seconds "
          "of the process (wall seconds), peak RSS GiB (extra over the loaded model). Ratios: CPU time "
          "(wall), peak memory (extra)\n")
    print("| model | method | peering | Captum | floor | peering / Captum | peering / floor | "
          "floor / Captum |")
    print("|---|---|---|---|---|---|---|---|")
    for name, method, s in rows:
        before = f"; before: {_cell(s, 'before')}" if "before" in s else ""
        print(f"| {name} | {method} | {_cell(s, 'peering')}{before} | {_cell(s, 'captum')} | "
              f"{_cell(s, 'floor')} | {_ratio(s, 'peering', 'captum')} | "
              f"{_ratio(s, 'peering', 'floor', False)} | {_ratio(s, 'floor', 'captum', False)} |")


def _cell(s: dict[str, Any], c: str) -> str:
    if c not in s:
        return "-"
    cpu, wall, peak, extra = s[c]
    return f"{cpu:.1f} ({wall:.1f}), {gib(peak)} ({gib(extra)})"


def _ratio(s: dict[str, Any], a: str, b: str, memory: bool = True) -> str:
    if a not in s or b not in s:
        return "-"
    x, y = s[a], s[b]
    text = f"{x[0] / y[0]:.2f} ({x[1] / y[1]:.2f})"
    return text + (f", {x[2] / y[2]:.2f} ({x[3] / y[3]:.2f})" if memory else "")


if __name__ == "__main__":
    main()
