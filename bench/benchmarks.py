"""Benchmarks, measured as ratios side by side in one run (GPU when present, CPU otherwise).

    python -m bench --out bench/results            # writes <device>.json
    python -m bench --smoke --out /tmp/bench        # seconds, for CI
    python -m bench --sections training --name cpu_training   # one section (or a comma list: training,bundle)

Options: ``--out``, ``--smoke``, ``--device``, ``--model`` (state dict of a watermarked experiment UNet: adds the
LIME sample sweep), ``--sections``, ``--name`` (output file name; default the device's).

1. LIME on one image: batched torch LIME vs the ``lime`` package (same segments, samples, kernel) — speed ratio
   and attribution correlation; with a watermarked model, decode success against the sample count.
2. Training: time per step with the watermark (transform + loss, triggered samples bring their twins) vs
   without, same network and batch, at poisoning ratios 0.5 (the default), 0.25 and 0.1.
3. Validation: time of a ``SupervisedEvaluator`` run with the ASR metric (direct / LIME) vs without.
4. Verification throughput: images per second in direct mode and in LIME mode (1000 samples per image) for several
   query batch sizes (+ peak GPU memory).
5. Bundle: the example bundles ``bundles/sunnybrook_lv_2d`` and ``bundles/hippocampus_mr_3d`` (8 training and 4
   validation subjects) as a user runs them — one training epoch of each one's ``SupervisedTrainer`` with
   ``train.json`` alone vs ``train.json`` + ``stealthmark_overlay.json`` (its data loader, cached dataset and random
   transforms included), and one run of its evaluator with vs without the overlay's AUC + ASR metrics. This is the
   issue's "time per epoch with the watermark vs the same bundle without it".
6. Loss: the watermark loss alone (forward + backward) on a batch the watermark stage built, 2D and 3D: aten
   operations (``TorchDispatchMode``), host reads of device values (``aten._local_scalar_dense``, ``aten.nonzero``)
   and time per call, next to the frozen reference implementation of ``tests/test_loss_equivalence.py`` when the
   bench runs from a source checkout.
Timings: warm-up, then the median (and min/max) of repeats, with CUDA synchronised.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import platform
import sys
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import list_data_collate
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, from_engine
from monai.inferers import SimpleInferer
from monai.losses import DiceCELoss
from monai.transforms import Activationsd, AsDiscreted, Compose
from torch.utils._python_dispatch import TorchDispatchMode

from experiments import as_list, cli, phase, progress
from experiments.bundle_pair import OVERLAY
from experiments.sunnybrook import ExperimentConfig, build_network, experiment_key
from monai_stealthmark.bundle import bundle_parser
from monai_stealthmark.data import load_sunnybrook
from monai_stealthmark.handlers import WatermarkASR
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.losses import UncertaintyWatermarkLoss, sample_flags
from monai_stealthmark.recipe import recipe_defaults
from monai_stealthmark.transforms import WatermarkBatch
from monai_stealthmark.utils import atomic_write_json
from monai_stealthmark.verify import ModelQuery, lime_attributions, lime_reference_attributions, verify_ownership

__all__ = ["SECTIONS", "timeit", "run", "main"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], Any], device: torch.device, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median / min / max seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    return timeit_interleaved({"fn": fn}, device, repeats, warmup)["fn"]


def timeit_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int = 5, warmup: int = 1) -> dict[str, dict[str, float]]:
    """:func:`timeit` for several functions run in turn (A B C A B C ...), so drift in the machine's speed hits
    each of them alike: the right way to take ratios between them."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts[k].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "repeats": repeats} for k, v in ts.items()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@dataclasses.dataclass
class Bench:
    """What the sections measure with: device, repeats, the experiments' key, test slices, a network and its query.

    Attributes:
        dev: the torch device.
        smoke: tiny sizes and few repeats.
        reps: timing repeats.
        channels: UNet channels.
        key: the experiments' key (:func:`~experiments.sunnybrook.experiment_key`).
        samples: the loaded slices (dicts).
        images, labels: the slices stacked on ``dev``.
        net: the UNet (watermarked when a model file was given).
        query: ``net`` as a black box.
        lime_samples: LIME samples per image.
        sweep: run the LIME sample sweep (a watermarked model was given).
    """

    dev: torch.device
    smoke: bool
    reps: int
    channels: tuple[int, ...]
    key: WatermarkKey
    samples: list[dict]
    images: torch.Tensor
    labels: torch.Tensor
    net: torch.nn.Module
    query: ModelQuery
    lime_samples: int
    sweep: bool


def _setup(smoke: bool, device: str | None, model_path: str | None) -> Bench:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = 64 if smoke else 128
    channels = (8, 16, 32, 64) if smoke else ExperimentConfig().channels
    samples = load_sunnybrook(size=size, patients=["SCD0000501"] if smoke else ["SCD0000401", "SCD0000501"])
    net = build_network(channels).to(dev).eval()
    if model_path and not smoke:
        net.load_state_dict(torch.load(model_path, map_location=dev))
    return Bench(
        dev=dev, smoke=smoke, reps=2 if smoke else 5, channels=channels, key=experiment_key(ExperimentConfig()),
        samples=samples, images=torch.stack([s["image"] for s in samples]).to(dev),
        labels=torch.stack([s["label"] for s in samples]).to(dev), net=net,
        query=ModelQuery(net, activation="softmax", device=dev), lime_samples=50 if smoke else 250,
        sweep=bool(model_path and not smoke),
    )


def bench_lime(b: Bench) -> dict[str, Any]:
    """1. LIME on one image: the torch LIME vs the ``lime`` package on the same samples (speed, agreement); with a
    watermarked model, decode success against the sample count."""
    img, n, key = b.images[0], b.lime_samples, b.key
    t_torch = timeit(lambda: lime_attributions(b.query, img, key, num_samples=n, seed=0), b.dev, repeats=b.reps)
    labels_all = list(range(key.grid_size**2))
    t_lime = timeit(lambda: lime_reference_attributions(b.query, img, key, num_samples=n, seed=0, labels=labels_all), b.dev, repeats=1, warmup=0)
    _, coef = lime_attributions(b.query, img, key, num_samples=n, seed=0, return_full=True)  # (features, outputs)
    ref = lime_reference_attributions(b.query, img, key, num_samples=n, seed=0, labels=labels_all)
    ours = coef.T.cpu().numpy()  # one row per explained output, as lime's local_exp
    r = float(np.corrcoef(ours.reshape(-1), np.stack([ref[k] for k in labels_all]).reshape(-1))[0, 1])
    res: dict[str, Any] = {"lime_one_image": {
        "samples": n, "torch": t_torch, "lime_package": t_lime, "speedup": t_lime["median_s"] / t_torch["median_s"], "attribution_r": r,
    }}
    if b.sweep:
        sweep = []
        for ns in (250, 500, 1000, 2000, 4000):
            rep = verify_ownership(b.query, b.images[-8:], key, mode="lime", lime_samples=ns)
            sweep.append({"samples": ns, "asr": rep.asr, "bit_accuracy": rep.mean_bit_accuracy, "seconds": rep.seconds})
        res["lime_samples_sweep"] = sweep
    return res


def _training_steps(b: Bench, bs: int, variants: dict[str, dict[str, Any]], sizes: dict[str, list[int]]) -> dict[str, Callable[[], None]]:
    """One clean training step and one watermarked step per stage variant, on the same network and optimiser.

    A watermarked step runs the batch-level watermark stage on the collated batch, as the overlay's
    ``prepare_batch`` does (every step draws anew); the batch sizes it produced go to ``sizes``.
    """
    train_items = [{"image": s["image"], "label": s["label"]} for s in b.samples][:bs]
    loss_w = UncertaintyWatermarkLoss(key=b.key)
    tnet = build_network(b.channels).to(b.dev)
    opt = torch.optim.Adam(tnet.parameters(), 1e-4)
    clean_batch, loss_c = list_data_collate(train_items), DiceCELoss(to_onehot_y=True, softmax=True)
    image, label = (torch.as_tensor(clean_batch[k]).as_subclass(torch.Tensor).to(b.dev) for k in ("image", "label"))

    def step(x, y, loss_fn):
        opt.zero_grad(set_to_none=True)
        loss_fn(tnet(x), y).backward()
        opt.step()

    def wm_step(name: str, settings: dict[str, Any]) -> Callable[[], None]:
        stage = WatermarkBatch(b.key, **settings).set_random_state(0)

        def f():
            x, y = stage(image, label)
            sizes[name].append(int(x.shape[0]))
            step(x, y, loss_w)

        return f

    return {"clean": lambda: step(image, label, loss_c)} | {name: wm_step(name, v) for name, v in variants.items()}


def bench_training(b: Bench) -> dict[str, Any]:
    """2. Time per training step with the watermark (stage + loss) vs without: the recipe, the recipe without the
    pipeline degradation (``degrade_prob=0``), the recipe with the batch kept at its loaded size
    (``keep_batch_size=True``) and lower poisoning ratios. Steps of all kinds
    run interleaved, with more repeats than elsewhere: the triggered share of a step varies."""
    bs = 8 if b.smoke else 24
    defaults = recipe_defaults()["transform"]
    variants: dict[str, dict[str, Any]] = {"recipe": {}}
    if not b.smoke:
        variants |= {"no_degradation": {"degrade_prob": 0.0}, "keep_batch_size": {"keep_batch_size": True},
                     "prob_0.25": {"prob": 0.25}, "prob_0.1": {"prob": 0.1}}
    sizes: dict[str, list[int]] = {name: [] for name in variants}
    times = timeit_interleaved(_training_steps(b, bs, variants, sizes), b.dev, repeats=b.reps if b.smoke else 4 * b.reps)
    t_clean = times["clean"]
    rows = []
    for name, settings in variants.items():
        t, n_img = times[name]["median_s"], float(np.mean(sizes[name]))
        rows.append({"variant": name, "prob": settings.get("prob", defaults["prob"]),
                     "keep_batch_size": settings.get("keep_batch_size", defaults["keep_batch_size"]),
                     "degrade_prob": settings.get("degrade_prob", defaults["degrade_prob"]), "ratio": t / t_clean["median_s"],
                     "images_per_step": n_img, "ratio_per_image": (t / n_img) / (t_clean["median_s"] / bs), "median_s": t})
    default = rows[0]
    return {"training_step": {
        "batch": bs, "clean": t_clean, "watermarked": times["recipe"], "ratio": default["ratio"],
        "watermarked_images_per_step": default["images_per_step"], "ratio_per_image": default["ratio_per_image"],
        "by_variant": rows,
    }}


def _evaluator(b: Bench, metrics: dict[str, Any]) -> SupervisedEvaluator:
    """A bundle-style evaluator of ``b.net`` on the test slices: MeanDice as key metric, plus ``metrics`` (MONAI
    attaches ``additional_metrics`` only next to a ``key_val_metric``)."""
    data = [{"image": b.images[i], "label": b.labels[i]} for i in range(b.images.shape[0])]
    post = Compose([Activationsd(keys="pred", softmax=True), AsDiscreted(keys=("pred", "label"), argmax=(True, False), to_onehot=2)])
    return SupervisedEvaluator(
        device=b.dev, val_data_loader=torch.utils.data.DataLoader(data, batch_size=8), network=b.net,
        inferer=SimpleInferer(), postprocessing=post,
        key_val_metric={"dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
        additional_metrics=metrics,
    )


def _validate(ev: SupervisedEvaluator, names: Sequence[str] = ("dice",)) -> None:
    """Run ``ev`` and check that it computed ``names``."""
    ev.run()
    missing = [m for m in names if m not in ev.state.metrics]
    if missing:
        raise RuntimeError(f"validation did not compute {missing}.")


def bench_validation(b: Bench) -> dict[str, Any]:
    """3. A validation run with the ASR metric (direct on all or 8 images, LIME on 2) vs without it."""
    ev_off, ev_dir = _evaluator(b, {}), _evaluator(b, {"asr": WatermarkASR(b.key, mode="direct")})
    ev_dir8 = _evaluator(b, {"asr": WatermarkASR(b.key, mode="direct", max_images=8)})
    ev_lime = _evaluator(b, {"asr": WatermarkASR(b.key, mode="lime", max_images=2, lime_samples=b.lime_samples)})
    times = timeit_interleaved(
        {"off": lambda: _validate(ev_off), "direct": lambda: _validate(ev_dir, ("dice", "asr")),
         "direct_8": lambda: _validate(ev_dir8, ("dice", "asr"))}, b.dev, repeats=b.reps,
    )
    t_off, t_dir, t_dir8 = times["off"], times["direct"], times["direct_8"]
    t_lime_v = timeit(lambda: _validate(ev_lime, ("dice", "asr")), b.dev, repeats=max(1, b.reps // 2))
    return {"validation": {
        "images": int(b.images.shape[0]), "off": t_off, "asr_direct": t_dir, "asr_lime_2_images": t_lime_v,
        "asr_direct_8_images": t_dir8,
        "ratio_direct": t_dir["median_s"] / t_off["median_s"], "ratio_direct_8_images": t_dir8["median_s"] / t_off["median_s"],
        "ratio_lime": t_lime_v["median_s"] / t_off["median_s"],
        "asr_value": {"direct": ev_dir.state.metrics["asr"], "direct_8_images": ev_dir8.state.metrics["asr"],
                      "lime": ev_lime.state.metrics["asr"]},
    }}


def _throughput(b: Bench, fn: Callable[[], Any], n_images: int, repeats: int, **fields: Any) -> dict[str, Any]:
    """Images per second of ``fn`` (which verifies ``n_images``), with its timings and peak GPU memory."""
    if b.dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(b.dev)
    t = timeit(fn, b.dev, repeats=repeats)
    row = {**fields, "images_per_s": n_images / t["median_s"], **t}
    if b.dev.type == "cuda":
        row["peak_mem_mb"] = torch.cuda.max_memory_allocated(b.dev) / 2**20
    return row


def bench_throughput(b: Bench) -> dict[str, Any]:
    """4. Verification throughput: direct mode by batch size, LIME mode (1000 samples per image) by query batch size
    (the perturbed images of one explained image go out in chunks)."""
    images, thr = b.images, []
    for bsz in (1, 8, 32):
        x = images[:bsz] if images.shape[0] >= bsz else images.repeat((bsz + images.shape[0] - 1) // images.shape[0], 1, 1, 1)[:bsz]
        fn = lambda x=x, bsz=bsz: verify_ownership(ModelQuery(b.net, device=b.dev, batch_size=bsz), x, b.key)  # noqa: E731
        thr.append(_throughput(b, fn, bsz, b.reps, batch=bsz))
    lime_thr = []
    n_img, ns = (1, b.lime_samples) if b.smoke else (4, 1000)
    for bsz in ((16, 64) if b.smoke else (64, 256, 1000)):
        q = ModelQuery(b.net, device=b.dev, batch_size=bsz)
        fn = lambda q=q, bsz=bsz: verify_ownership(q, images[:n_img], b.key, mode="lime", lime_samples=ns, lime_batch_size=bsz)  # noqa: E731
        lime_thr.append(_throughput(b, fn, n_img, max(1, b.reps // 2), batch=bsz, samples=ns, images=n_img))
    return {"direct_throughput": thr, "lime_throughput": lime_thr}


def bench_bundle(b: Bench) -> dict[str, Any]:
    """5. Each example bundle of :data:`BUNDLES` with vs without the overlay (:func:`bundle_epochs`), one after the
    other in this run."""
    return {"bundle": {name: bundle_epochs(b.dev, b.key, b.smoke, b.reps, name) for name in BUNDLES}}


class OpCounter(TorchDispatchMode):
    """Count the aten operations that run inside the context (forward and backward alike), by name.

    ``host_reads`` counts the operations that make the host wait for a device value: reading a scalar
    (``aten._local_scalar_dense``: ``.item()``, ``bool(t)``, ``if t.any()``) and ``aten.nonzero`` (its output size
    is read back). On a GPU each of them stalls the launch queue.
    """

    HOST_READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique")

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def host_reads(self) -> int:
        return sum(n for op, n in self.ops.items() if any(op.startswith(h) for h in self.HOST_READS))


def count_ops(fn: Callable[[], Any]) -> dict[str, Any]:
    """aten operations and host reads of one call of ``fn``."""
    with OpCounter() as counter:
        fn()
    return {"aten_ops": counter.total, "host_reads": counter.host_reads}


def _reference_loss_class() -> type | None:
    """The frozen reference implementation of the loss in ``tests/test_loss_equivalence.py`` (None outside a
    source checkout)."""
    tests = Path(__file__).resolve().parents[1] / "tests"
    if not (tests / "test_loss_equivalence.py").is_file():
        return None
    if str(tests) not in sys.path:
        sys.path.insert(0, str(tests))
    return importlib.import_module("test_loss_equivalence").ReferenceUncertaintyWatermarkLoss


def _loss_inputs(b: Bench, spatial: tuple[int, ...], n: int, n_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded logits and a target that the watermark stage built (twins, decoys, occlusion) from ``n`` samples."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(n, 1, *spatial, generator=g)
    lab = torch.zeros(n, 1, *spatial)
    lab[(slice(None), slice(None), slice(spatial[0] // 4, spatial[0] // 2), slice(spatial[1] // 4, spatial[1] // 2))] = 1
    stage = WatermarkBatch(b.key).set_random_state(seed)
    _, target = stage(img.to(b.dev), lab.to(b.dev))
    logits = torch.randn(target.shape[0], n_classes, *spatial, generator=g).to(b.dev)
    return logits, target


SEED_2D, SEED_3D = 3, 5  # the stage's draws with the experiments' key: 8 of 16 and 2 of 4 samples triggered


def bench_loss(b: Bench) -> dict[str, Any]:
    """6. The watermark loss, forward + backward: aten operations, host reads and time per call, for the package's
    loss (``loss``: the CPU's row selection; ``loss_dense``: every row weighted, as on an accelerator) and the
    reference implementation, on a 2D batch (16 samples, 128x128, 2 classes) and a 3D one (4 samples,
    64x64x32, 3 classes), both through the watermark stage at the recipe's defaults."""
    # (spatial, samples, classes, seed): seeds whose draws trigger half of the samples, as the recipe's prob does
    cases = {"2d": ((64, 64) if b.smoke else (128, 128), 16, 2, SEED_2D),
             "3d": ((32, 32, 8) if b.smoke else (64, 64, 32), 4, 3, SEED_3D)}
    ref_cls = _reference_loss_class()
    out: dict[str, Any] = {"reference": "tests/test_loss_equivalence.py" if ref_cls is not None else None}
    for name, (spatial, n, n_classes, seed) in cases.items():
        logits, target = _loss_inputs(b, spatial, n, n_classes, seed)
        dense = UncertaintyWatermarkLoss(key=b.key)
        dense.host_subset = False  # every row weighted: the accelerator's path
        losses = {"loss": UncertaintyWatermarkLoss(key=b.key), "loss_dense": dense}
        if ref_cls is not None:
            losses["reference"] = ref_cls(key=b.key)

        def call(loss: torch.nn.Module) -> Callable[[], None]:
            def f() -> None:
                loss(logits.detach().requires_grad_(True), target).backward()
            return f

        calls = {k: call(v) for k, v in losses.items()}
        times = timeit_interleaved(calls, b.dev, repeats=b.reps if b.smoke else 4 * b.reps)
        row: dict[str, Any] = {"rows": int(target.shape[0]), "triggered_rows": int((~sample_flags(target[:, -1:])[1]).sum()),
                               "spatial": list(spatial), "classes": n_classes}
        for k, f in calls.items():
            row[k] = {**count_ops(f), **times[k]}
        if "reference" in row:
            row["time_ratio_to_reference"] = row["loss"]["median_s"] / row["reference"]["median_s"]
        out[name] = row
    return {"loss": out}


SECTIONS = ("lime", "training", "validation", "throughput", "bundle", "loss")
_BENCHES: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "lime": bench_lime, "training": bench_training, "validation": bench_validation, "throughput": bench_throughput,
    "bundle": bench_bundle, "loss": bench_loss,
}


def run(
    smoke: bool = False, device: str | None = None, model_path: str | None = None, sections: Sequence[str] | None = None
) -> dict[str, Any]:
    """Run the benchmarks and return their figures.

    Args:
        smoke: tiny sizes and few repeats (seconds, for CI).
        device: torch device; default CUDA when present, else CPU.
        model_path: state dict of a watermarked experiment UNet (enables the LIME sample sweep).
        sections: which of :data:`SECTIONS` to run; all when None.
    """
    todo = set(SECTIONS if sections is None else sections)
    if todo - set(SECTIONS):
        raise ValueError(f"unknown bench sections {sorted(todo - set(SECTIONS))}; choose from {SECTIONS}.")
    phase("loading the test slices")
    b = _setup(smoke, device, model_path)
    res: dict[str, Any] = {"device": _device_name(b.dev), "torch": torch.__version__, "smoke": smoke, "image_size": int(b.images.shape[-1])}
    res["sections"] = [k for k in SECTIONS if k in todo]
    for name in progress(res["sections"], desc="bench", unit="section"):
        phase(f"bench section: {name}")
        res.update(_BENCHES[name](b))
    return res


def _stage_setting(trainer: Any, name: str) -> Any:
    """A setting of the watermark stage the overlay wired into a trainer (None when there is none)."""
    return getattr(getattr(trainer.prepare_batch, "stage", None), name, None)


#: the example bundles the bench times, with the settings that keep one run short: 2D Sunnybrook as shipped,
#: 3D hippocampus on 8 training and 16 validation subjects (the ASR reads a fixed number of windows per validation,
#: so its share of the evaluator shrinks as the validation set grows; the bundle holds out 60)
BUNDLES: dict[str, dict[str, Any]] = {
    "sunnybrook_lv_2d": {},
    "hippocampus_mr_3d": {"num_train": 8, "num_val": 16},
}
_SMOKE_OVERRIDES: dict[str, dict[str, Any]] = {
    "sunnybrook_lv_2d": {
        "image_size": 64,
        "datalist": "$[d for d in monai_stealthmark.data.sunnybrook_datalist(@dataset_dir) if d['patient'] in ('SCD0000401', 'SCD0000501')]",
        "network_def#channels": [8, 16, 32], "network_def#strides": [2, 2], "network_def#num_res_units": 1,
    },
    "hippocampus_mr_3d": {
        "num_train": 2, "num_val": 1, "network_def#channels": [8, 16, 32], "network_def#strides": [2, 2],
        "network_def#num_res_units": 1,
    },
}


def bundle_epochs(dev: torch.device, key: Any, smoke: bool, reps: int, name: str = "sunnybrook_lv_2d") -> dict[str, Any]:
    """5. One example bundle, parsed twice (without / with the overlay): seconds per training epoch and per
    evaluator run, interleaved, median of ``4 * reps`` (``reps`` in smoke runs). Validation is off during the timed
    epochs (``val_interval`` beyond the epoch)."""
    bundle = OVERLAY.parent / name
    if not bundle.is_dir():
        raise FileNotFoundError(f"the example bundle {str(bundle)!r} is missing (the bench runs from a source checkout).")
    overrides: dict[str, Any] = {"max_epochs": 1, "val_interval": 10**6, "device": f"$torch.device({str(dev)!r})"}
    overrides |= BUNDLES[name] | (_SMOKE_OVERRIDES[name] if smoke else {})
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "key.json"
        key.save(key_file)
        parsers = {
            cfg: bundle_parser(bundle, files, Path(tmp) / cfg, key_file if cfg == "watermarked" else None, overrides)
            for cfg, files in (("clean", ["train.json"]), ("watermarked", ["train.json", str(OVERLAY)]))
        }
        for p in parsers.values():
            p.get_parsed_content("initialize")
        trainers = {cfg: p.get_parsed_content("train#trainer") for cfg, p in parsers.items()}
        evaluators = {cfg: p.get_parsed_content("validate#evaluator") for cfg, p in parsers.items()}
        reps = reps if smoke else 4 * reps  # a 2D epoch or evaluator run takes a fraction of a second on an idle CPU
        epochs = timeit_interleaved({cfg: t.run for cfg, t in trainers.items()}, dev, repeats=reps)
        vals = timeit_interleaved({cfg: e.run for cfg, e in evaluators.items()}, dev, repeats=reps)
        wm_metrics = {k: float(v) for k, v in evaluators["watermarked"].state.metrics.items() if isinstance(v, (int, float))}
        if "val_wm_asr" not in wm_metrics:
            raise RuntimeError("the overlaid evaluator did not compute val_wm_asr.")
        asr = next(h for h in _metric_handlers(evaluators["watermarked"]) if isinstance(h, WatermarkASR))
        return {
            "bundle": bundle.name,
            "overrides": {k: v for k, v in overrides.items() if k != "device"},
            "train_items": len(trainers["clean"].data_loader.dataset),
            "val_items": len(evaluators["clean"].data_loader.dataset),
            "batch_size": int(parsers["clean"]["batch_size"]),
            "overlay_prob": _stage_setting(trainers["watermarked"], "prob"),
            "overlay_keep_batch_size": _stage_setting(trainers["watermarked"], "keep_batch_size"),
            "asr_images": asr.max_images,
            "epoch": epochs,
            "epoch_ratio": epochs["watermarked"]["median_s"] / epochs["clean"]["median_s"],
            "validation": vals,
            "validation_ratio": vals["watermarked"]["median_s"] / vals["clean"]["median_s"],
            "validation_metrics_watermarked": wm_metrics,
        }


def _metric_handlers(engine: Any) -> list[Any]:
    """The ignite metric objects attached to ``engine`` (the owners of its bound event handlers)."""
    found = []
    for handlers in engine._event_handlers.values():
        for h in handlers:
            owner = getattr(h[0], "__self__", None)
            if owner is not None and owner not in found:
                found.append(owner)
    return found


def main(out: str = "bench/results", smoke: bool = False, device: str | None = None, model: str | None = None,
         sections: str | Sequence[str] = SECTIONS, name: str | None = None) -> None:
    """Run the benchmarks, write ``<out>/<name>.json`` and print the main ratios.

    Args:
        out: output folder.
        smoke: tiny sizes (seconds), for CI.
        device: torch device (default: CUDA when present).
        model: state dict of a watermarked experiment UNet (enables the LIME sample sweep).
        sections: which benchmarks to run: one or a comma list of :data:`SECTIONS` (default all).
        name: output file name (default: ``smoke`` or the device's name).
    """
    res = run(smoke, device, model, as_list(sections, SECTIONS, "sections"))
    slug = name or ("smoke" if smoke else "".join(c if c.isalnum() else "_" for c in res["device"].split(" (")[0]).lower())
    path = Path(out) / f"{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, res)
    print(f"wrote {path}")
    rows = [(k, res[k]) for k in ("lime_one_image", "training_step", "validation") if k in res]
    rows += [(f"bundle {name}", r) for name, r in res.get("bundle", {}).items()]
    for k, r in rows:
        print(k, {kk: (round(vv, 3) if isinstance(vv, float) else vv) for kk, vv in r.items() if not isinstance(vv, dict)})


if __name__ == "__main__":
    raise SystemExit(cli(main))
