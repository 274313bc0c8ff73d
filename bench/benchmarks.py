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
5. Bundle: the example bundle ``bundles/sunnybrook_lv_2d`` as a user runs it — one training epoch of its
   ``SupervisedTrainer`` with ``train.json`` alone vs ``train.json`` + ``stealthmark_overlay.json`` (its data loader,
   cached dataset and random transforms included), and one run of its evaluator with vs without the overlay's
   AUC + ASR metrics. This is the issue's "time per epoch with the watermark vs the same bundle without it".
Timings: warm-up, then the median (and min/max) of repeats, with CUDA synchronised.
"""

from __future__ import annotations

import dataclasses
import platform
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

from experiments import as_list, cli, phase, progress
from experiments.bundle_pair import OVERLAY
from experiments.sunnybrook import ExperimentConfig, build_network, experiment_key
from monai_stealthmark.bundle import bundle_parser
from monai_stealthmark.data import load_sunnybrook
from monai_stealthmark.handlers import WatermarkASR
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.losses import UncertaintyWatermarkLoss
from monai_stealthmark.recipe import recipe_defaults
from monai_stealthmark.transforms import RandWatermarkd
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


def _training_steps(b: Bench, bs: int, probs: Sequence[float], sizes: dict[float, list[int]]) -> dict[str, Callable[[], None]]:
    """One clean training step and one watermarked step per poisoning ratio, on the same network and optimiser.

    A watermarked step runs its transform too (every step draws anew); the batch sizes it produced go to ``sizes``.
    """
    train_items = [{"image": s["image"], "label": s["label"]} for s in b.samples][:bs]
    loss_w = UncertaintyWatermarkLoss(key=b.key)
    tnet = build_network(b.channels).to(b.dev)
    opt = torch.optim.Adam(tnet.parameters(), 1e-4)

    def step(batch, loss_fn):
        opt.zero_grad(set_to_none=True)
        loss_fn(tnet(batch["image"].to(b.dev)), batch["label"].to(b.dev)).backward()
        opt.step()

    def wm_step(prob: float) -> Callable[[], None]:
        wm_t = RandWatermarkd(keys=("image", "label"), key=b.key, prob=prob)
        wm_t.set_random_state(seed=0)

        def f():
            batch = list_data_collate([wm_t(dict(d)) for d in train_items])
            sizes[prob].append(int(batch["image"].shape[0]))  # triggered samples bring their clean twin
            step(batch, loss_w)

        return f

    clean_batch, loss_c = list_data_collate(train_items), DiceCELoss(to_onehot_y=True, softmax=True)
    return {"clean": lambda: step(clean_batch, loss_c)} | {f"prob_{pr}": wm_step(pr) for pr in probs}


def bench_training(b: Bench) -> dict[str, Any]:
    """2. Time per training step with the watermark (transform + loss) vs without, at the recipe's poisoning ratio
    and lower ones (a step's cost grows with its triggered images). Steps of all kinds run interleaved, with more
    repeats than elsewhere: the batch size of a watermarked step varies."""
    bs = 8 if b.smoke else 24
    default_prob = recipe_defaults()["transform"]["prob"]
    probs = (default_prob,) if b.smoke else (default_prob, 0.25, 0.1)
    sizes: dict[float, list[int]] = {pr: [] for pr in probs}
    times = timeit_interleaved(_training_steps(b, bs, probs, sizes), b.dev, repeats=b.reps if b.smoke else 4 * b.reps)
    t_clean = times["clean"]
    by_prob = []
    for pr in probs:
        t, n_img = times[f"prob_{pr}"]["median_s"], float(np.mean(sizes[pr]))
        by_prob.append({"prob": pr, "ratio": t / t_clean["median_s"], "images_per_step": n_img,
                        "ratio_per_image": (t / n_img) / (t_clean["median_s"] / bs), "median_s": t})
    default = by_prob[0]
    return {"training_step": {
        "batch": bs, "clean": t_clean, "watermarked": times[f"prob_{default['prob']}"], "ratio": default["ratio"],
        "watermarked_images_per_step": default["images_per_step"], "ratio_per_image": default["ratio_per_image"],
        "by_prob": by_prob,
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
    """5. The example bundle with vs without the overlay (:func:`bundle_epochs`)."""
    return {"bundle": bundle_epochs(b.dev, b.key, b.smoke, b.reps)}


SECTIONS = ("lime", "training", "validation", "throughput", "bundle")
_BENCHES: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "lime": bench_lime, "training": bench_training, "validation": bench_validation, "throughput": bench_throughput,
    "bundle": bench_bundle,
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


def _poisoning_ratio(trainer: Any) -> float | None:
    """The share of triggered samples of a trainer the overlay wired (None when it cannot be read)."""
    stage = getattr(trainer.prepare_batch, "stage", None)
    return float(stage.prob) if hasattr(stage, "prob") else None


def bundle_epochs(dev: torch.device, key: Any, smoke: bool, reps: int) -> dict[str, Any]:
    """5. The example 2D bundle, parsed twice (without / with the overlay): seconds per training epoch and per
    evaluator run, interleaved. Validation is off during the timed epochs (``val_interval`` beyond the epoch)."""
    bundle = OVERLAY.parent / "sunnybrook_lv_2d"
    if not bundle.is_dir():
        raise FileNotFoundError(f"the example bundle {str(bundle)!r} is missing (the bench runs from a source checkout).")
    overrides: dict[str, Any] = {"max_epochs": 1, "val_interval": 10**6, "device": f"$torch.device({str(dev)!r})"}
    if smoke:  # one training patient, a small network
        overrides |= {
            "image_size": 64,
            "datalist": "$[d for d in monai_stealthmark.data.sunnybrook_datalist(@dataset_dir) if d['patient'] in ('SCD0000401', 'SCD0000501')]",
            "network_def#channels": [8, 16, 32], "network_def#strides": [2, 2], "network_def#num_res_units": 1,
        }
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "key.json"
        key.save(key_file)
        parsers = {
            name: bundle_parser(bundle, files, Path(tmp) / name, key_file if name == "watermarked" else None, overrides)
            for name, files in (("clean", ["train.json"]), ("watermarked", ["train.json", str(OVERLAY)]))
        }
        for p in parsers.values():
            p.get_parsed_content("initialize")
        trainers = {name: p.get_parsed_content("train#trainer") for name, p in parsers.items()}
        evaluators = {name: p.get_parsed_content("validate#evaluator") for name, p in parsers.items()}
        epochs = timeit_interleaved({name: t.run for name, t in trainers.items()}, dev, repeats=reps)
        vals = timeit_interleaved({name: e.run for name, e in evaluators.items()}, dev, repeats=reps)
        wm_metrics = {k: float(v) for k, v in evaluators["watermarked"].state.metrics.items() if isinstance(v, (int, float))}
        if "val_wm_asr" not in wm_metrics:
            raise RuntimeError("the overlaid evaluator did not compute val_wm_asr.")
        n_train = len(trainers["clean"].data_loader.dataset)
        n_val = len(evaluators["clean"].data_loader.dataset)
        return {
            "bundle": bundle.name,
            "train_slices": n_train,
            "val_slices": n_val,
            "batch_size": int(parsers["clean"]["batch_size"]),
            "overlay_prob": _poisoning_ratio(trainers["watermarked"]),
            "epoch": epochs,
            "epoch_ratio": epochs["watermarked"]["median_s"] / epochs["clean"]["median_s"],
            "validation": vals,
            "validation_ratio": vals["watermarked"]["median_s"] / vals["clean"]["median_s"],
            "validation_metrics_watermarked": wm_metrics,
        }


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
    for k in ("lime_one_image", "training_step", "validation", "bundle"):
        if k in res:
            print(k, {kk: (round(vv, 3) if isinstance(vv, float) else vv) for kk, vv in res[k].items() if not isinstance(vv, dict)})


if __name__ == "__main__":
    raise SystemExit(cli(main))
