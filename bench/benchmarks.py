"""Benchmarks, measured as ratios side by side in one run (GPU when present, CPU otherwise).

    python -m bench --out bench/results            # writes <device>.json
    python -m bench --smoke --out /tmp/bench        # seconds, for CI
    python -m bench --sections training --name cpu_training   # one section only

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

import argparse
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_stealthmark.utils import atomic_write_json

__all__ = ["timeit", "run", "main"]


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


SECTIONS = ("lime", "training", "validation", "throughput", "bundle")


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
    from monai.data import list_data_collate
    from monai.engines import SupervisedEvaluator
    from monai.handlers import MeanDice, from_engine
    from monai.inferers import SimpleInferer
    from monai.losses import DiceCELoss
    from monai.transforms import Activationsd, AsDiscreted, Compose

    from monai_stealthmark.data import load_sunnybrook
    from experiments.sunnybrook import KEY_SEED, PAYLOAD, build_network
    from monai_stealthmark.handlers import WatermarkASR
    from monai_stealthmark.key import WatermarkKey
    from monai_stealthmark.losses import UncertaintyWatermarkLoss
    from monai_stealthmark.transforms import RandWatermarkd
    from monai_stealthmark.verify import ModelQuery, lime_attributions, lime_reference_attributions, verify_ownership

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reps = 2 if smoke else 5
    size = 64 if smoke else 128
    channels = (8, 16, 32, 64) if smoke else (16, 32, 64, 128, 256)
    key = WatermarkKey.generate(PAYLOAD, seed=KEY_SEED, tau=0.25, created_at="2026-11-23T00:00:00+00:00")
    samples = load_sunnybrook(size=size, patients=["SCD0000501"] if smoke else ["SCD0000401", "SCD0000501"])
    images = torch.stack([s["image"] for s in samples]).to(dev)
    labels = torch.stack([s["label"] for s in samples]).to(dev)
    net = build_network(channels).to(dev).eval()
    if model_path and not smoke:
        net.load_state_dict(torch.load(model_path, map_location=dev))
    query = ModelQuery(net, activation="softmax", device=dev)
    res: dict[str, Any] = {"device": _device_name(dev), "torch": torch.__version__, "smoke": smoke, "image_size": size}
    res["sections"] = [k for k in SECTIONS if k in todo]
    n = 50 if smoke else 250  # LIME samples per image

    if "lime" in todo:
        # 1. LIME: torch vs the lime package on the same samples
        img = images[0]
        t_torch = timeit(lambda: lime_attributions(query, img, key, num_samples=n, seed=0), dev, repeats=reps)
        labels_all = list(range(key.grid_size**2))
        t_lime = timeit(lambda: lime_reference_attributions(query, img, key, num_samples=n, seed=0, labels=labels_all), dev, repeats=1, warmup=0)
        _, coef = lime_attributions(query, img, key, num_samples=n, seed=0, return_full=True)  # (features, outputs)
        ref = lime_reference_attributions(query, img, key, num_samples=n, seed=0, labels=labels_all)
        ours = coef.T.cpu().numpy()  # one row per explained output, as lime's local_exp
        r = float(np.corrcoef(ours.reshape(-1), np.stack([ref[k] for k in labels_all]).reshape(-1))[0, 1])
        res["lime_one_image"] = {
            "samples": n,
            "torch": t_torch,
            "lime_package": t_lime,
            "speedup": t_lime["median_s"] / t_torch["median_s"],
            "attribution_r": r,
        }
        if model_path and not smoke:
            sweep = []
            for ns in (250, 500, 1000, 2000, 4000):
                rep = verify_ownership(query, images[-8:], key, mode="lime", lime_samples=ns)
                sweep.append({"samples": ns, "asr": rep.asr, "bit_accuracy": rep.mean_bit_accuracy, "seconds": rep.seconds})
            res["lime_samples_sweep"] = sweep

    if "training" in todo:
        # 2. training step with vs without the watermark (same network, batch, optimiser)
        bs = 8 if smoke else 24
        train_items = [{"image": s["image"], "label": s["label"]} for s in samples][:bs]
        clean_batch = list_data_collate(train_items)
        loss_c, loss_w = DiceCELoss(to_onehot_y=True, softmax=True), UncertaintyWatermarkLoss(key=key)
        tnet = build_network(channels).to(dev)
        opt = torch.optim.Adam(tnet.parameters(), 1e-4)

        def step(batch, loss_fn):
            def f():
                opt.zero_grad(set_to_none=True)
                loss_fn(tnet(batch["image"].to(dev)), batch["label"].to(dev)).backward()
                opt.step()

            return f

        def wm_step(prob: float, sizes: list[int]) -> Callable[[], None]:
            """One watermarked training step at poisoning ratio ``prob``, transform included (it runs every step)."""
            wm_t = RandWatermarkd(keys=("image", "label"), key=key, prob=prob)
            wm_t.set_random_state(seed=0)

            def f():
                batch = list_data_collate([wm_t(dict(d)) for d in train_items])
                sizes.append(int(batch["image"].shape[0]))  # triggered samples bring their clean twin
                step(batch, loss_w)()

            return f

        # the default poisoning ratio, then lower ones (a step's cost grows with its triggered images); steps of all
        # kinds interleaved, and more repeats than elsewhere: the batch size of a watermarked step varies
        probs = (0.5,) if smoke else (0.5, 0.25, 0.1)
        sizes: dict[float, list[int]] = {pr: [] for pr in probs}
        fns = {"clean": step(clean_batch, loss_c)} | {f"prob_{pr}": wm_step(pr, sizes[pr]) for pr in probs}
        times = timeit_interleaved(fns, dev, repeats=reps if smoke else 4 * reps)
        t_clean = times["clean"]
        by_prob = []
        for pr in probs:
            t, n_img = times[f"prob_{pr}"]["median_s"], float(np.mean(sizes[pr]))
            by_prob.append({"prob": pr, "ratio": t / t_clean["median_s"], "images_per_step": n_img,
                            "ratio_per_image": (t / n_img) / (t_clean["median_s"] / bs), "median_s": t})
        default = by_prob[0]
        res["training_step"] = {
            "batch": bs, "clean": t_clean, "watermarked": times[f"prob_{default['prob']}"], "ratio": default["ratio"],
            "watermarked_images_per_step": default["images_per_step"], "ratio_per_image": default["ratio_per_image"],
            "by_prob": by_prob,
        }

    if "validation" in todo:
        # 3. validation with / without the ASR metric. MONAI attaches ``additional_metrics`` only next to a
        # ``key_metric``, so every run validates with MeanDice as a bundle does, and checks that the ASR was computed.
        data = [{"image": images[i], "label": labels[i]} for i in range(images.shape[0])]
        post = Compose([Activationsd(keys="pred", softmax=True), AsDiscreted(keys=("pred", "label"), argmax=(True, False), to_onehot=2)])

        def evaluator(metrics):
            return SupervisedEvaluator(
                device=dev, val_data_loader=torch.utils.data.DataLoader(data, batch_size=8), network=net,
                inferer=SimpleInferer(), postprocessing=post,
                key_val_metric={"dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
                additional_metrics=metrics,
            )

        def validate(ev, names=("dice",)):
            ev.run()
            missing = [m for m in names if m not in ev.state.metrics]
            if missing:
                raise RuntimeError(f"validation did not compute {missing}.")

        ev_off = evaluator({})
        ev_dir = evaluator({"asr": WatermarkASR(key, mode="direct")})
        ev_dir8 = evaluator({"asr": WatermarkASR(key, mode="direct", max_images=8)})
        ev_lime = evaluator({"asr": WatermarkASR(key, mode="lime", max_images=2, lime_samples=n)})
        times = timeit_interleaved(
            {"off": lambda: validate(ev_off), "direct": lambda: validate(ev_dir, ("dice", "asr")),
             "direct_8": lambda: validate(ev_dir8, ("dice", "asr"))}, dev, repeats=reps,
        )
        t_off, t_dir, t_dir8 = times["off"], times["direct"], times["direct_8"]
        t_lime_v = timeit(lambda: validate(ev_lime, ("dice", "asr")), dev, repeats=max(1, reps // 2))
        res["validation"] = {
            "images": len(data), "off": t_off, "asr_direct": t_dir, "asr_lime_2_images": t_lime_v,
            "asr_direct_8_images": t_dir8,
            "ratio_direct": t_dir["median_s"] / t_off["median_s"], "ratio_direct_8_images": t_dir8["median_s"] / t_off["median_s"],
            "ratio_lime": t_lime_v["median_s"] / t_off["median_s"],
            "asr_value": {"direct": ev_dir.state.metrics["asr"], "direct_8_images": ev_dir8.state.metrics["asr"],
                          "lime": ev_lime.state.metrics["asr"]},
        }

    if "throughput" in todo:

        def throughput(fn: Callable[[], Any], n_images: int, repeats: int, **fields: Any) -> dict[str, Any]:
            """Images per second of ``fn`` (which verifies ``n_images``), with its timings and peak GPU memory."""
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            t = timeit(fn, dev, repeats=repeats)
            row = {**fields, "images_per_s": n_images / t["median_s"], **t}
            if dev.type == "cuda":
                row["peak_mem_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
            return row

        # 4. direct-mode throughput by batch size
        thr = []
        for b in (1, 8, 32):
            x = images[:b] if images.shape[0] >= b else images.repeat((b + images.shape[0] - 1) // images.shape[0], 1, 1, 1)[:b]
            thr.append(throughput(lambda x=x, b=b: verify_ownership(ModelQuery(net, device=dev, batch_size=b), x, key), b, reps, batch=b))
        res["direct_throughput"] = thr
        # LIME-mode throughput by query batch size (the perturbed images of one explained image go out in chunks)
        lime_thr = []
        n_img = 1 if smoke else 4
        ns = n if smoke else 1000
        for b in ((16, 64) if smoke else (64, 256, 1000)):
            q = ModelQuery(net, device=dev, batch_size=b)
            fn = lambda q=q, b=b: verify_ownership(q, images[:n_img], key, mode="lime", lime_samples=ns, lime_batch_size=b)  # noqa: E731
            lime_thr.append(throughput(fn, n_img, max(1, reps // 2), batch=b, samples=ns, images=n_img))
        res["lime_throughput"] = lime_thr

    if "bundle" in todo:
        res["bundle"] = bundle_epochs(dev, key, smoke, reps)

    return res


def bundle_epochs(dev: torch.device, key: Any, smoke: bool, reps: int) -> dict[str, Any]:
    """5. The example 2D bundle, parsed twice (without / with the overlay): seconds per training epoch and per
    evaluator run, interleaved. Validation is off during the timed epochs (``val_interval`` beyond the epoch)."""
    import tempfile

    from monai_stealthmark.bundle import bundle_parser
    from experiments.bundle_pair import OVERLAY

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
            "overlay_prob": float(parsers["watermarked"]["stealthmark"]["prob"]),
            "epoch": epochs,
            "epoch_ratio": epochs["watermarked"]["median_s"] / epochs["clean"]["median_s"],
            "validation": vals,
            "validation_ratio": vals["watermarked"]["median_s"] / vals["clean"]["median_s"],
            "validation_metrics_watermarked": wm_metrics,
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds), for CI")
    p.add_argument("--device", default=None)
    p.add_argument("--model", default=None, help="state dict of a watermarked experiment UNet (enables the LIME sample sweep)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="which benchmarks to run")
    p.add_argument("--name", default=None, help="output file name (default: the device's name)")
    a = p.parse_args(argv)
    res = run(a.smoke, a.device, a.model, a.sections)
    slug = a.name or ("smoke" if a.smoke else "".join(c if c.isalnum() else "_" for c in res["device"].split(" (")[0]).lower())
    out = Path(a.out) / f"{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, res)
    print(f"wrote {out}")
    for k in ("lime_one_image", "training_step", "validation", "bundle"):
        if k not in res:
            continue
        v = res[k]
        print(k, {kk: (round(vv, 3) if isinstance(vv, float) else vv) for kk, vv in v.items() if not isinstance(vv, dict)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
