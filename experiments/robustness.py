"""Robustness of the watermark on the Sunnybrook 2D setting: the attack suite, persistence under fine-tuning,
data-driven restoration and a loss-landscape plot.

    python -m experiments.robustness --fast --out runs/robustness [--epochs 20] [--data DIR] [--steps N]

Options: ``--epochs`` (fine-tuning epochs of the attacks and of the persistence run), ``--distill-steps``,
``--overwrite-steps``, ``--data`` (the Sunnybrook folder) and any setting of the owner's training or recipe
deviation (:class:`~experiments.sunnybrook.ExperimentConfig`, e.g. ``--steps 800 --margin-consistency 0``).

The owner trains the watermarked UNet on three patients (SCD0000101/201/301); the attacker owns a fourth
(SCD0000401) — disjoint from the owner's data — and every number is measured on the fifth (SCD0000501):
clean Dice of the attacked model and the black-box claim (direct read-out) on its triggered slices. The
``pipeline_spacing`` rows send the test slices at their own 256 x 256 grid to a bundle pipeline that resamples them to
another spacing, verified through the stated-spacing sweep (:func:`pipeline_spacing_rows`). Students
distilled from the model's answers are claimed through the trigger or the key's output mark (the ``distill`` rows'
p-value is the mark's); a clean model of the owner's setting, its student and two more clean models are the
controls (in the soft UNet student's row, ``extra["controls"]``).
Writes ``robustness.json`` (rows ``{"attack", "params", "clean_dice", "asr", "p_value", "removed", "seconds"}``),
``robustness.md``, ``persistence.json`` and the plots ``persistence.png`` and ``landscape.png``.

    python -m experiments.robustness --formats runs/demo --out results/robustness
    python -m experiments.robustness --pipeline runs/demo --out results/robustness

measure, on the clean and the watermarked model of a finished demo run, only the query transformations of a clinical
pipeline (blur, resampling, noise, JPEG, flip TTA, queries at the slices' own grid; ``pipeline.json``,
``pipeline.md``), or only the deployment formats: the models in torch and exported to ONNX, run by onnxruntime in
fp32, fp16 and real int8 (``formats.json``, ``formats.md``).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import DiceMetric

from experiments import UsageError, cli, phase, progress
from experiments.sunnybrook import (
    ExperimentConfig,
    _training_settings,
    build_network,
    experiment_key,
    load_or_train,
    make_config,
)
from monai_stealthmark import attacks as A
from monai_stealthmark.attacks._common import train_steps
from monai_stealthmark.data import load_sunnybrook, split_by_patient, sunnybrook_datalist
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.key.geometry import WM_DARK, WM_LIGHT, qr_target_map
from monai_stealthmark.losses import UncertaintyWatermarkLoss
from monai_stealthmark.utils import atomic_write_bytes, atomic_write_json, atomic_write_text
from monai_stealthmark.verify import (
    ModelQuery,
    OnnxModelQuery,
    detect_output_mark,
    trigger_batch,
    verify_badnet,
    verify_over_scales,
    verify_ownership,
)

__all__ = ["Split", "Distillation", "ONNX_ROWS", "onnx_attacks", "attack_suite", "run_attacks", "make_verify", "dice", "run", "deployment_formats", "formats_markdown", "query_pipelines", "pipeline_markdown", "pipeline_spacing_rows", "swept_spacing_row", "runtime_ops", "markdown", "main"]

OWNER = ["SCD0000101", "SCD0000201", "SCD0000301"]
ATTACKER = ["SCD0000401"]
TEST = ["SCD0000501"]
FINETUNE_LR = 1e-3  # the persistence run's fine-tuning: strong, so that there is something to restore
RESTORE = {"steps": 30, "lr": 1e-4}  # the owner's short training on their clean data


def _stack(samples):
    return torch.stack([s["image"] for s in samples]), torch.stack([s["label"] for s in samples])


@dataclasses.dataclass
class Split:
    """The Sunnybrook slices by role: the owner's training samples and images, the attacker's labelled slices,
    the held-out test slices, and the unlabelled slices a distillation attacker may query with (all but the test
    patient's: public data of the same kind)."""

    owner: list[dict]
    own_x: torch.Tensor
    own_y: torch.Tensor
    att_x: torch.Tensor
    att_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    query_x: torch.Tensor

    @classmethod
    def load(cls, data_root: str | Path, size: int) -> Split:
        phase(f"loading the Sunnybrook slices from {data_root}")
        samples = load_sunnybrook(data_root, size=size)
        owner = [s for s in samples if s["patient"] in OWNER]
        return cls(
            owner, *_stack(owner), *_stack([s for s in samples if s["patient"] in ATTACKER]),
            *_stack([s for s in samples if s["patient"] in TEST]),
            _stack([s for s in samples if s["patient"] in ATTACKER + OWNER])[0],
        )


def dice(model, images, labels) -> float:
    """Mean Dice of the LV class: ``model`` is a network (logits) or a black box returning probabilities."""
    with torch.no_grad():
        p = ModelQuery(model, activation="softmax", device="cpu")(images) if isinstance(model, torch.nn.Module) else model(images)
    pred = p.argmax(1, keepdim=True)
    dm = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
    dm(torch.cat([pred == 0, pred == 1], 1).float(), torch.cat([labels == 0, labels == 1], 1).float())
    return float(dm.aggregate())


def make_verify(images: torch.Tensor, key: WatermarkKey, badnet: bool = False) -> Callable[[Any], Any]:
    """``model or black box -> report`` of the claim on ``images`` (direct read-out; the BadNet check for
    ``badnet``)."""

    def verify(m):
        q = ModelQuery(m, activation="softmax", device="cpu") if isinstance(m, torch.nn.Module) else m
        return verify_badnet(q, images, key) if badnet else verify_ownership(q, images, key)

    return verify


@dataclasses.dataclass(frozen=True)
class Distillation:
    """The distillation attacker: the unlabelled images they query the suspect with, student steps, the students'
    UNet channels and batch size."""

    queries: torch.Tensor
    steps: int
    channels: Sequence[int]
    batch_size: int = 16


# clean models trained independently of the owner's at these seeds (with the run's own seed, the clean teacher, three)
CONTROL_SEEDS = (1, 2)


@dataclasses.dataclass(frozen=True)
class DistillationClaim:
    """The owner's claim against a student: the trigger watermark (ASR, bit accuracy) or the output mark, which
    is what a student of the watermarked model's answers inherits; ``p_value`` is the output mark's."""

    asr: float
    mean_bit_accuracy: float
    p_value: float
    verdict: bool


def make_distillation_verify(images: torch.Tensor, key: WatermarkKey) -> Callable[[Any], DistillationClaim]:
    """``model -> DistillationClaim`` on the held-out ``images``: the trigger claim on their triggered copies, the
    output-mark test on them as they are."""

    def verify(m):
        q = ModelQuery(m, activation="softmax", device="cpu")
        trigger, mark = verify_ownership(q, images, key), detect_output_mark(q, images, key)
        return DistillationClaim(trigger.asr, trigger.mean_bit_accuracy, mark.p_value, bool(trigger.verdict or mark.verdict))

    return verify


def distillation_controls(split: Split, cfg: ExperimentConfig, distillation: Distillation, key: WatermarkKey,
                          out: Path) -> list[dict[str, Any]]:
    """The models that must not carry the output mark: a clean model of the owner's setting (the run's seed) and
    a soft-output UNet student of it, and clean models at :data:`CONTROL_SEEDS` (trained once, kept in ``out``).
    Each row: ``{"model", "role", "clean_dice", "p_value", "t", "shown"}`` of the output-mark test on the held-out
    slices."""

    def row(model: str, role: str, net: torch.nn.Module) -> dict[str, Any]:
        mark = detect_output_mark(ModelQuery(net, activation="softmax", device="cpu"), split.test_x, key)
        return {"model": model, "role": role, "clean_dice": dice(net, split.test_x, split.test_y), "p_value": mark.p_value,
                "t": mark.t, "shown": mark.verdict}

    phase(f"distillation controls: clean models (seeds {cfg.seed}, {', '.join(map(str, CONTROL_SEEDS))}) and a student")
    teacher = clean_model(cfg, cfg.seed, split.owner, out, "clean")
    student = distil(teacher, distillation, "soft", "unet")
    rows = [row(f"clean, seed {cfg.seed}", "independent", teacher),
            row(f"clean seed {cfg.seed} -> unet (soft)", "student of a clean model", student)]
    return rows + [row(f"clean, seed {s}", "independent", clean_model(cfg, s, split.owner, out)) for s in CONTROL_SEEDS]


def clean_model(cfg: ExperimentConfig, seed: int, train: list[dict], out: Path, name: str | None = None) -> torch.nn.Module:
    """A clean model of ``cfg``'s setting at ``seed``, trained on ``train`` and kept as ``out/<name>.pt`` (default
    ``clean_seed<seed>``), or reused from there."""
    c = copy.copy(cfg)
    c.seed = seed
    name = name or f"clean_seed{seed}"
    return load_or_train(out / f"{name}.pt", train, c, None, torch.device("cpu"), out / f"ckpt_{name}",
                         _training_settings(c, "clean")).cpu().eval()


def distil(net: torch.nn.Module, distillation: Distillation, outputs: str, arch: str) -> torch.nn.Module:
    """A student (``arch``) trained on ``net``'s soft outputs or hard masks to the attacker's queries."""
    torch.manual_seed(1)
    teacher = ModelQuery(net, activation="softmax", device="cpu")
    d = distillation
    return A.distill(teacher, build_network(d.channels, arch), d.queries, steps=d.steps, outputs=outputs, batch_size=d.batch_size)


def _distillation_attacks(net, distillation: Distillation) -> dict[str, tuple]:
    """Students trained on the suspect's soft outputs (UNet, BasicUNet) or hard masks (UNet)."""
    d, suite = distillation, {}
    for outputs, arch in (("soft", "unet"), ("soft", "basicunet"), ("hard", "unet")):
        params = {"outputs": outputs, "student": arch, "steps": d.steps, "queries": int(d.queries.shape[0] * 5)}
        suite[f"distill_{outputs}_{arch}"] = ("distill", params, lambda o=outputs, a=arch: distil(net, d, o, a))
    return suite


ONNX_ROWS = {
    "fp32": ("onnxruntime_fp32", {"format": "ONNX", "runtime": "onnxruntime CPU"}),
    "fp16": ("onnxruntime_fp16", {"format": "ONNX fp16 (onnxruntime.transformers.float16, fp32 I/O)", "runtime": "onnxruntime CPU"}),
    "int8": ("onnxruntime_int8_static", {"format": "ONNX int8 static QDQ (per-channel int8 weights, uint8 activations)",
                                         "runtime": "onnxruntime CPU", "calibration": "attacker slices"}),
}


def onnx_attacks(net: torch.nn.Module, att_x: torch.Tensor) -> dict[str, tuple[str, dict[str, Any], Callable[[], Any]]]:
    """The deployment-format rows: the model exported to ONNX and queried through onnxruntime in fp32, fp16 and real
    int8 (static, QDQ, calibrated on the attacker's clean slices ``att_x``), each a black box returning probabilities
    (:class:`~monai_stealthmark.verify.OnnxModelQuery`, as many threads as torch uses)."""
    suite = {}
    for precision, (name, params) in ONNX_ROWS.items():
        def deploy(p=precision):
            proto = A.onnx_deployment(net, att_x[:1], p, calibration_images=att_x if p == "int8" else None)
            return OnnxModelQuery(proto, activation="softmax", threads=torch.get_num_threads())

        suite[name] = (name, dict(params), deploy)
    return suite


def attack_suite(
    net: torch.nn.Module,
    att_x: torch.Tensor,
    att_y: torch.Tensor,
    epochs: int,
    distillation: Distillation | None = None,
) -> dict[str, tuple[str, dict[str, Any], Callable[[], Any]]]:
    """Every attack of the suite, by label: ``label -> (attack, params, build the attacked model or query)``.

    The robustness experiment runs them all, in this order; the variants experiment and tutorial 3 pick some by
    label (e.g. ``"global_prune_0.5"``, ``"input_blur_1px"``, ``"distill_soft_unet"``). Nothing runs before a
    builder is called.

    Args:
        net: the watermarked model (never changed: each attack works on a copy).
        att_x, att_y: the attacker's labelled slices (fine-tuning, pruning activations, int8 calibration).
        epochs: fine-tuning epochs.
        distillation: the distillation attacker (no distillation attacks when None).
    """
    def tune(m, ep=epochs, lr=1e-4, **kw):
        return A.finetune(m, att_x, att_y, epochs=ep, lr=lr, **kw)

    suite: dict[str, tuple] = {"none": ("none", {}, lambda: net)}
    suite["finetune_all"] = ("finetune_all", {"epochs": epochs, "lr": 1e-4}, lambda: tune(net))
    suite["finetune_last"] = ("finetune_last", {"epochs": epochs, "lr": 1e-4}, lambda: tune(net, layers="last"))
    suite["reinit_head_finetune"] = ("reinit_head_finetune", {"epochs": epochs, "lr": 1e-3}, lambda: tune(net, lr=1e-3, reinit=True))
    for amount in (0.1, 0.3, 0.5, 0.7, 0.9):
        suite[f"global_prune_{amount}"] = ("global_prune", {"amount": amount}, lambda a=amount: A.global_magnitude_prune(net, a))
    suite["global_prune_finetune"] = ("global_prune_finetune", {"amount": 0.5, "epochs": 5, "lr": 1e-4}, lambda: tune(A.global_magnitude_prune(net, 0.5), 5))
    suite["fine_pruning"] = ("fine_pruning", {"amount": 0.5, "layers": 2, "epochs": 5}, lambda: tune(A.channel_prune(net, att_x, 0.5), 5))
    suite["fp16"] = ("fp16", {}, lambda: A.CastQuery(net, torch.float16))
    suite["bf16"] = ("bf16", {}, lambda: A.CastQuery(net, torch.bfloat16))
    suite["int8_weights"] = ("int8_weights", {}, lambda: A.int8_weights(net))
    suite["int8_static"] = ("int8_static", {"calibration": "attacker slices"}, lambda: A.int8_static(net, att_x))
    suite["torchscript_roundtrip"] = ("torchscript_roundtrip", {}, lambda: A.torchscript_roundtrip(net, att_x[:1]))
    suite.update(onnx_attacks(net, att_x))
    for s in (0.01, 0.05, 0.1):
        suite[f"weight_noise_{s}"] = ("weight_noise", {"scale": s}, lambda s=s: A.weight_noise(net, s))
    if distillation is not None:
        suite.update(_distillation_attacks(net, distillation))
    for name, make in A.INPUT_ATTACKS.items():
        query = lambda make=make: A.InputTransformQuery(ModelQuery(net, activation="softmax", device="cpu"), make())  # noqa: E731
        suite[f"input_{name}"] = (f"input_{name}", {}, query)
    return suite


def run_attacks(
    attacks: Sequence[tuple[str, dict[str, Any], Callable[[], Any]]],
    evaluate: Callable[[Any], float],
    verify: Callable[[Any], Any],
    reference_dice: float,
    claim_shown: bool = True,
    label: str = "attacks",
) -> list[dict[str, Any]]:
    """Run each attack with :func:`~monai_stealthmark.attacks.run_attack` under a progress bar; print and return
    the rows. With ``claim_shown`` False nothing counts as removed (the claim had failed before any attack)."""
    rows = []
    bar = progress(attacks, desc=label, unit="attack")
    for name, params, attack in bar:
        bar.set_postfix_str(name)
        r = A.run_attack(name, params, attack, evaluate, verify, reference_dice)
        r.removed = r.removed and claim_shown
        rows.append(r.to_dict())
        bar.write(f"{label} {name:26s} {params!s:40s} Dice {r.clean_dice:.4f}  ASR {r.asr:.3f}  p {r.p_value:.2g}  "
                  f"removed {r.removed}", file=sys.stdout)
    return rows


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.dtype.is_floating_point])


def watermark_loss(model, images, labels, key) -> float:
    """The watermark loss on the owner's triggered images (what the landscape plot shows)."""
    x = trigger_batch(images, key)
    dark = qr_target_map(key, tuple(images.shape[2:])).to(images.device).float()
    wm = torch.where(dark > 0, float(WM_DARK), float(WM_LIGHT)).expand(images.shape[0], 1, *images.shape[2:])
    with torch.no_grad():
        return float(UncertaintyWatermarkLoss(key=key)(model(x), torch.cat([labels, wm], 1)))


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_persistence(rows, path: Path) -> None:
    fig, ax = _pyplot().subplots(1, 2, figsize=(9, 3.2))
    ep = [r["epoch"] for r in rows]
    ax[0].plot(ep, [r["asr"] for r in rows], "o-", label="ASR (direct)")
    ax[0].plot(ep, [r["clean_dice"] for r in rows], "s-", label="clean Dice")
    ax[0].set_xlabel("fine-tuning epoch")
    ax[0].set_ylim(-0.05, 1.05)
    ax[0].legend()
    ax[1].plot(ep, [r["drift_l2"] for r in rows], "o-")
    ax[1].set_xlabel("fine-tuning epoch")
    ax[1].set_ylabel("L2 distance to watermarked weights")
    fig.tight_layout()
    _save_figure(fig, path)


def _plot_landscape(grid, xs, ys, traj, path: Path) -> None:
    fig, ax = _pyplot().subplots(figsize=(4.6, 4))
    cs = ax.contourf(xs, ys, grid.T, levels=20, cmap="viridis")
    fig.colorbar(cs, label="watermark loss (owner's triggered data)")
    ax.plot(traj[:, 0], traj[:, 1], "w.-", label="fine-tuning path")
    ax.plot(traj[0, 0], traj[0, 1], "r*", ms=12, label="watermarked")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)


def _persistence(net, split: Split, epochs: int, verify) -> tuple[list[dict[str, Any]], list[torch.Tensor], torch.nn.Module]:
    """ASR, Dice and weight drift epoch by epoch while fine-tuning a copy on the attacker's data.

    Returns the rows, the flat weights after each epoch (the trajectory, watermarked weights first) and the
    fine-tuned model.
    """
    persist, traj = [], [_flat(net)]
    m = copy.deepcopy(net)
    w0 = _flat(net)
    for e in progress(range(epochs + 1), desc="persistence", unit="epoch"):
        if e > 0:
            m = train_steps(m, split.att_x, split.att_y, steps=-(-split.att_x.shape[0] // 8), lr=FINETUNE_LR, seed=e)
            traj.append(_flat(m))
        rep = verify(m)
        persist.append({"epoch": e, "asr": rep.asr, "p_value": rep.p_value, "clean_dice": dice(m, split.test_x, split.test_y),
                        "drift_l2": float((_flat(m) - w0).norm())})
    return persist, traj, m


def _restoration(tuned, persist, split: Split, epochs: int, verify) -> dict[str, Any]:
    """A short training of the fine-tuned model on the owner's clean data only (no trigger): does the QR return?"""
    restored = train_steps(copy.deepcopy(tuned), split.own_x, split.own_y, steps=RESTORE["steps"], lr=RESTORE["lr"], seed=99)
    rep_r = verify(restored)
    return {
        "finetune": {"epochs": epochs, "lr": FINETUNE_LR, "asr": persist[-1]["asr"], "drift_l2": persist[-1]["drift_l2"]},
        "restored": {**RESTORE, "data": "owner's clean training slices", "asr": rep_r.asr, "p_value": rep_r.p_value,
                     "clean_dice": dice(restored, split.test_x, split.test_y)},
    }


def _load_flat(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Set ``model``'s floating-point state to the values of the flat vector ``flat`` (in :func:`_flat`'s order)."""
    sd = model.state_dict()
    off = 0
    for k in [k for k, v in sd.items() if v.dtype.is_floating_point]:
        n = sd[k].numel()
        sd[k] = flat[off : off + n].view(sd[k].shape)
        off += n
    model.load_state_dict(sd)


def _landscape(net, traj: list[torch.Tensor], split: Split, key: WatermarkKey, points: int, path: Path) -> None:
    """Plot the watermark loss over the first two principal directions of the fine-tuning trajectory."""
    w0 = traj[0]
    T = torch.stack(traj) - w0
    _, _, V = torch.pca_lowrank(T, q=2, center=False)
    coords = (T @ V).numpy()
    span = max(np.abs(coords).max() * 1.3, 1e-3)
    xs = ys = np.linspace(-span, span, points)
    probe = copy.deepcopy(net)
    grid = np.zeros((len(xs), len(ys)))
    for n in progress(range(grid.size), desc="loss landscape", unit="point"):
        i, j = divmod(n, len(ys))
        _load_flat(probe, w0 + xs[i] * V[:, 0] + ys[j] * V[:, 1])
        grid[i, j] = watermark_loss(probe.eval(), split.own_x[:16], split.own_y[:16], key)
    _plot_landscape(grid, xs, ys, coords, path)


def _overwrite_row(net, split: Split, cfg: ExperimentConfig, steps: int, evaluate, verify, reference_dice, claim_shown) -> dict:
    """The attacker embeds their own watermark; the row also records whether the attacker's claim verifies."""
    attacker_key = WatermarkKey.generate("ATTACKER:0001", seed=4242, tau=cfg.watermark()["key"]["tau"])
    overwritten = {}

    def do_overwrite():
        overwritten["m"] = A.overwrite(net, split.att_x, split.att_y, attacker_key, steps=steps, lr=1e-4)
        return overwritten["m"]

    (row,) = run_attacks([("overwrite", {"steps": steps, "lr": 1e-4}, do_overwrite)], evaluate, verify, reference_dice, claim_shown)
    row["extra"] = {"attacker_claim_asr": verify_ownership(ModelQuery(overwritten["m"], device="cpu"), split.test_x, attacker_key).asr}
    return row


def run(
    out: str | Path,
    fast: bool = True,
    epochs: int = 20,
    distill_steps: int | None = None,
    overwrite_steps: int | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Train (or reuse ``out/watermarked.pt``), attack, and write the tables and plots.

    Args:
        out: output folder.
        fast: the CPU setting.
        epochs: fine-tuning epochs of the attacks and of the persistence run.
        distill_steps: student steps (default 2400 fast / 4800 full).
        overwrite_steps: attacker's embedding steps (default 150 fast / 600 full).
        **settings: the owner's training settings and recipe deviations (:func:`~experiments.sunnybrook.make_config`:
            e.g. ``steps``, ``data``, ``cutmix_prob``, ``margin_consistency``).
    """
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = make_config(fast, **settings)
    key = experiment_key(cfg)
    key.save(out / "key.json")
    split = Split.load(cfg.data_root, cfg.size)
    net = load_or_train(out / "watermarked.pt", split.owner, cfg, key, torch.device("cpu"), out / "ckpt").cpu().eval()
    verify = make_verify(split.test_x, key)

    def evaluate(m):
        return dice(m, split.test_x, split.test_y)

    ref_dice = evaluate(net)
    base = verify(net)
    phase(f"attacks on the watermarked model (ASR {base.asr:.3f}, clean Dice {ref_dice:.4f})")
    distillation = Distillation(split.query_x, distill_steps or (2400 if fast else 4800), cfg.channels)
    suite = list(attack_suite(net, split.att_x, split.att_y, epochs, distillation).values())
    rows = run_attacks([a for a in suite if a[0] != "distill"], evaluate, verify, ref_dice, base.verdict)
    phase(f"bundle pipelines resampling the {NATIVE_SIZE} px slices to {', '.join(map(str, PIPELINE_SPACINGS))} mm, stated-spacing sweep")
    rows += pipeline_spacing_rows(net, cfg, key, base.verdict)
    distill_verify = make_distillation_verify(split.test_x, key)
    rows += run_attacks([a for a in suite if a[0] == "distill"], evaluate, distill_verify, ref_dice, base.verdict, "distillation")
    controls = distillation_controls(split, cfg, distillation, key, out)
    soft_unet = {"outputs": "soft", "student": "unet"}
    soft_row = next(r for r in rows if r["attack"] == "distill" and soft_unet.items() <= r["params"].items())
    soft_row["extra"] = {"claim": "output mark", "controls": controls}
    rows.append(_overwrite_row(net, split, cfg, overwrite_steps or (150 if fast else 600), evaluate, verify, ref_dice, base.verdict))
    phase(f"persistence: fine-tuning {epochs} epochs at lr {FINETUNE_LR}, then restoration and the loss landscape")
    persist, traj, tuned = _persistence(net, split, epochs, verify)
    _plot_persistence(persist, out / "persistence.png")
    restoration = _restoration(tuned, persist, split, epochs, verify)
    _landscape(net, traj, split, key, 9 if fast else 17, out / "landscape.png")
    res = {
        "setting": {"owner": OWNER, "attacker": ATTACKER, "test": TEST, "steps": cfg.steps, "fast": fast, "device": "cpu"},
        "watermarked": {"clean_dice": ref_dice, "asr": base.asr, "p_value": base.p_value},
        "rows": rows, "persistence": persist, "restoration": restoration, "seconds": time.perf_counter() - t_start,
    }
    atomic_write_json(out / "robustness.json", rows)
    atomic_write_json(out / "persistence.json", {k: res[k] for k in ("setting", "watermarked", "persistence", "restoration", "seconds")})
    atomic_write_text(out / "robustness.md", markdown(res))
    return res


FORMAT_MODELS = ("watermarked", "clean")
_RUN_SETTINGS = ("channels", "arch", "size", "test_patient", "patients")  # what rebuilds a saved demo network


def _run_settings(run_dir: Path) -> dict[str, Any]:
    """The network and data settings recorded beside a demo run's watermarked model (none when not recorded)."""
    rec = run_dir / "watermarked.settings.json"
    if not rec.is_file():
        return {}
    saved = json.loads(rec.read_text())
    return {k: (tuple(v) if isinstance(v, list) and k == "channels" else v) for k, v in saved.items() if k in _RUN_SETTINGS}


def _load_model(path: Path, cfg: ExperimentConfig) -> torch.nn.Module:
    if not path.is_file():
        raise UsageError(f"{path} not found: --formats takes a finished run of `python -m experiments.sunnybrook` "
                         "(watermarked.pt, clean.pt, key.json).")
    net = build_network(cfg.channels, cfg.arch)
    net.load_state_dict(torch.load(path, map_location="cpu"))
    return net.eval()


def load_demo_run(run_dir: Path, option: str, fast: bool, settings: dict[str, Any]) -> tuple[ExperimentConfig, WatermarkKey, dict[str, torch.nn.Module]]:
    """The settings, key and models (:data:`FORMAT_MODELS`) of a finished demo run; ``option`` names the command-line
    option that was given the folder, for the message when it is not one."""
    if not (run_dir / "key.json").is_file():
        raise UsageError(f"{run_dir / 'key.json'} not found: {option} takes a finished run of `python -m experiments.sunnybrook`.")
    torch.manual_seed(0)
    cfg = make_config(fast, **{**_run_settings(run_dir), **settings})
    key = WatermarkKey.load(run_dir / "key.json")
    return cfg, key, {name: _load_model(run_dir / f"{name}.pt", cfg) for name in FORMAT_MODELS}


def _format_row(model: str, net, label, params, build, x, y, verify, claim_shown: bool) -> dict[str, Any]:
    """One model in one deployment format: the attack row, plus how far its probabilities are from the torch
    model's on the clean held-out slices and its time per image."""
    built = {}

    def deploy():
        built["q"] = build()
        return built["q"]

    reference = ModelQuery(net, activation="softmax", device="cpu")
    ref_dice = dice(reference, x, y)
    (row,) = run_attacks([(label, params, deploy)], lambda q: dice(q, x, y), verify, ref_dice, claim_shown, model)
    q = built["q"] if not isinstance(built["q"], torch.nn.Module) else ModelQuery(built["q"], activation="softmax", device="cpu")
    with torch.no_grad():
        p_ref = reference(x)
        t0 = time.perf_counter()
        p = q(x)
        ms = (time.perf_counter() - t0) * 1000 / x.shape[0]
    diff = (p - p_ref).abs()
    row["model"] = model
    row["extra"] = {"max_prob_diff": float(diff.max()), "mean_prob_diff": float(diff.mean()),
                    "argmax_agreement": float((p.argmax(1) == p_ref.argmax(1)).float().mean()), "ms_per_image": ms}
    if isinstance(q, OnnxModelQuery):
        row["extra"]["runtime_ops"] = runtime_ops(q.runtime.proto)
    return row


def runtime_ops(proto) -> dict[str, int]:
    """How many nodes of each operator type onnxruntime's CPU provider runs for ``proto`` after its graph
    optimisations (e.g. the ``QLinearConv`` integer kernels it fuses a QDQ graph into)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="stealthmark_ort_") as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return dict(sorted(ops.items()))


def deployment_formats(run_dir: str | Path, out: str | Path, fast: bool = True, **settings: Any) -> dict[str, Any]:
    """The demo's two models in torch and as a thief deploys them, exported to ONNX and run by onnxruntime (CPU) in
    fp32, fp16 and real int8 (static, QDQ, calibrated on another patient's clean slices), measured on the held-out
    patient: clean Dice, ASR, bit accuracy and p-value (direct read-out), and the distance to the torch outputs.

    Args:
        run_dir: a finished ``python -m experiments.sunnybrook`` run (``watermarked.pt``, ``clean.pt``, ``key.json``;
            the network's settings are read from ``watermarked.settings.json`` when it is there).
        out: output folder for ``formats.json`` and ``formats.md``.
        fast: the CPU setting.
        **settings: run settings (e.g. ``data``, ``test_patient``, ``channels``) overriding the recorded ones.
    """
    t_start = time.perf_counter()
    run_dir, out = Path(run_dir), Path(out)
    cfg, key, nets = load_demo_run(run_dir, "--formats", fast, settings)
    phase(f"loading the Sunnybrook slices from {cfg.data_root}")
    samples = load_sunnybrook(cfg.data_root, size=cfg.size, patients=cfg.patients)
    train, test = split_by_patient(samples, [cfg.test_patient])
    calib_patient = next(p for p in ATTACKER + sorted({s["patient"] for s in train}) if p != cfg.test_patient)
    calib_x = torch.stack([s["image"] for s in train if s["patient"] == calib_patient])
    x, y = _stack(test)
    verify = make_verify(x, key)
    rows = []
    for name, net in nets.items():
        shown = bool(verify(net).verdict)
        suite = {"none": ("none", {}, lambda net=net: net), **onnx_attacks(net, calib_x)}
        phase(f"{name} model: torch and onnxruntime fp32 / fp16 / int8")
        rows += [_format_row(name, net, *entry, x, y, verify, shown) for entry in suite.values()]
    res = {
        "setting": {"run": str(run_dir), "test": cfg.test_patient, "n_images": int(x.shape[0]), "calibration": calib_patient,
                    "n_calibration": int(calib_x.shape[0]), "network": f"{cfg.arch} {tuple(cfg.channels)}", "size": cfg.size,
                    "threads": torch.get_num_threads(), "versions": _versions(), "key_fingerprint": key.fingerprint},
        "rows": rows, "seconds": time.perf_counter() - t_start,
    }
    atomic_write_json(out / "formats.json", res)
    atomic_write_text(out / "formats.md", formats_markdown(res))
    return res


WRONG_KEYS = 5  # wrong-key controls per pipeline row
NATIVE_SIZE = 256  # the Sunnybrook slices' own grid: what the owner sends to a pipeline that serves a 128 network
# a bundle pipeline's Spacingd targets (mm) around the network's training grid (2.58 and 2.73 mm: the patients' 256 px
# fields of view at 128 px): the resampled query is larger than the window (tiled by the sliding window) or smaller
# (padded); 2.7344 mm puts the held-out patient's slices on exactly 128 px
PIPELINE_SPACINGS = (2.5, 2.6, 2.7344, 3.0)
# the stated-spacing factors the sweep searches (verify_over_scales): pipelines from half to twice the training spacing
SWEEP_RANGE = (0.5, 2.0)


def _pixel_spacing(data_root: str | Path, patient: str) -> float:
    """The in-plane pixel spacing (mm) of a Sunnybrook patient's DICOM slices."""
    import pydicom

    first = next(i for i in sunnybrook_datalist(data_root) if i["patient"] == patient)
    return float(pydicom.dcmread(first["image"], stop_before_pixels=True).PixelSpacing[0])


def query_pipelines(run_dir: str | Path, out: str | Path, fast: bool = True, **settings: Any) -> dict[str, Any]:
    """The demo's two models behind the query transformations of a clinical pipeline, measured on the held-out
    patient: each input attack of :data:`~monai_stealthmark.attacks.INPUT_ATTACKS` (blur, resampling, noise,
    intensity, JPEG, flip TTA), and queries at the slices' own 256 x 256 grid that the pipeline resamples to the
    network's grid and back (:class:`~monai_stealthmark.attacks.GridQuery`) or that a bundle pipeline resamples to
    each of :data:`PIPELINE_SPACINGS` and segments with a sliding window
    (:class:`~monai_stealthmark.attacks.SpacingQuery`). Each row of the watermarked model also
    verifies with :data:`WRONG_KEYS` wrong keys (their most decoded share is ``wrong_key_asr``).

    Args:
        run_dir: a finished ``python -m experiments.sunnybrook`` run.
        out: output folder for ``pipeline.json`` and ``pipeline.md``.
        fast: the CPU setting.
        **settings: run settings overriding the recorded ones.
    """
    t_start = time.perf_counter()
    run_dir, out = Path(run_dir), Path(out)
    cfg, key, nets = load_demo_run(run_dir, "--pipeline", fast, settings)
    wrong = [key.replace(trigger_seed=key.trigger_seed + 1 + i) for i in range(WRONG_KEYS)]
    phase(f"loading the Sunnybrook slices from {cfg.data_root} at {cfg.size} and {NATIVE_SIZE} pixels")
    query_mm = _pixel_spacing(cfg.data_root, cfg.test_patient)
    grids = {}
    for size in (cfg.size, NATIVE_SIZE):
        samples = load_sunnybrook(cfg.data_root, size=size, patients=cfg.patients)
        grids[size] = _stack(split_by_patient(samples, [cfg.test_patient])[1])
    rows = []
    for name, net in nets.items():
        model_query = ModelQuery(net, activation="softmax", device="cpu")
        suite = [("none", cfg.size, lambda q=model_query: q)]
        suite += [(f"input_{a}", cfg.size, lambda q=model_query, make=make: A.InputTransformQuery(q, make()))
                  for a, make in A.INPUT_ATTACKS.items()]
        suite.append((f"native_{NATIVE_SIZE}", NATIVE_SIZE, lambda q=model_query: A.GridQuery(q, (cfg.size, cfg.size))))
        suite += [(f"spacing_{mm}mm", NATIVE_SIZE,
                   lambda q=model_query, mm=mm: A.SpacingQuery(q, query_mm, mm, (cfg.size, cfg.size)))
                  for mm in PIPELINE_SPACINGS]
        phase(f"{name} model behind {len(suite)} query pipelines")
        shown = bool(verify_ownership(model_query, grids[cfg.size][0], key).verdict)
        for label, size, build in suite:
            x, y = grids[size]
            ref = dice(model_query if size == cfg.size else A.GridQuery(model_query, (cfg.size, cfg.size)), x, y)
            params = {"query_size": size}
            (row,) = run_attacks([(label, params, build)], lambda q: dice(q, x, y), make_verify(x, key), ref, shown, name)
            row["model"] = name
            if name == "watermarked":
                q = build()
                row["extra"] = {"wrong_key_asr": max(verify_ownership(q, x, k).asr for k in wrong)}
            rows.append(row)
        rows += _swept_spacing_rows(name, model_query, grids[NATIVE_SIZE][0], query_mm, cfg, key, wrong, rows, shown)
    res = {
        "setting": {"run": str(run_dir), "test": cfg.test_patient, "n_images": int(grids[cfg.size][0].shape[0]),
                    "network": f"{cfg.arch} {tuple(cfg.channels)}", "size": cfg.size, "native_size": NATIVE_SIZE,
                    "trigger": key.trigger, "trigger_size": key.trigger_size, "wrong_keys": WRONG_KEYS,
                    "key_fingerprint": key.fingerprint},
        "rows": rows, "seconds": time.perf_counter() - t_start,
    }
    atomic_write_json(out / "pipeline.json", res)
    atomic_write_text(out / "pipeline.md", pipeline_markdown(res))
    return res


def swept_spacing_row(query: ModelQuery, x: torch.Tensor, query_mm: float, mm: float, cfg: ExperimentConfig,
                      key: WatermarkKey, dice_value: float, reference_dice: float, shown: bool,
                      wrong: Sequence[WatermarkKey] = ()) -> dict[str, Any]:
    """One bundle pipeline that resamples the owner's ``query_mm`` queries to ``mm`` and segments them with a sliding
    window (:class:`~monai_stealthmark.attacks.SpacingQuery`), verified by stating a series of pixel spacings in the
    queries' headers (:func:`~monai_stealthmark.verify.verify_over_scales`, p-value corrected for the series).

    ``dice_value`` is the pipeline's Dice at the true spacing, ``reference_dice`` the model's without the pipeline;
    each of ``wrong`` is swept alike and the most decoded share is ``extra["wrong_key_asr"]``.
    """
    def make(scale: float):
        return A.SpacingQuery(query, query_mm * scale, mm, (cfg.size, cfg.size))

    t0 = time.perf_counter()
    rep = verify_over_scales(make, x, key, *SWEEP_RANGE)
    row = {"attack": "pipeline_spacing", "params": {"spacing_mm": mm, "query_size": int(x.shape[-1]), "scale": rep.scale,
           "n_scales": rep.n_scales, "probes": rep.probes}, "clean_dice": dice_value, "asr": rep.asr,
           "p_value": rep.p_value, "bit_accuracy": rep.mean_bit_accuracy, "verdict": rep.verdict,
           "removed": A.is_removed(rep.verdict, dice_value, reference_dice) and shown, "seconds": time.perf_counter() - t0}
    if wrong:
        row["extra"] = {"wrong_key_asr": max(verify_over_scales(make, x, k, *SWEEP_RANGE).asr for k in wrong)}
    print(f"pipeline_spacing {mm} mm: stated scale {rep.scale:.4f} ASR {rep.asr:.3f} p {rep.p_value:.2g}", flush=True)
    return row


def _swept_spacing_rows(name: str, query: ModelQuery, x: torch.Tensor, query_mm: float, cfg: ExperimentConfig,
                        key: WatermarkKey, wrong: list[WatermarkKey], rows: list[dict[str, Any]], shown: bool) -> list[dict[str, Any]]:
    """Each :data:`PIPELINE_SPACINGS` pipeline through :func:`swept_spacing_row` (rows ``spacing_<mm>mm_stated``);
    the Dice is the pipeline's row without the sweep."""
    ref = next(r["clean_dice"] for r in rows if r["model"] == name and r["attack"] == "none")
    out = []
    for mm in PIPELINE_SPACINGS:
        d = next(r["clean_dice"] for r in rows if r["model"] == name and r["attack"] == f"spacing_{mm}mm")
        row = swept_spacing_row(query, x, query_mm, mm, cfg, key, d, ref, shown, wrong if name == "watermarked" else ())
        out.append({**row, "attack": f"spacing_{mm}mm_stated", "model": name})
    return out


def pipeline_spacing_rows(net: torch.nn.Module, cfg: ExperimentConfig, key: WatermarkKey, shown: bool) -> list[dict[str, Any]]:
    """The attack suite's pipeline rows: the test patient's slices sent at their own 256 x 256 grid to a bundle
    pipeline that resamples them to each of :data:`PIPELINE_SPACINGS` (:func:`swept_spacing_row`; the wrong-key
    controls of the same sweep are in ``--pipeline``'s table)."""
    x, y = _stack(load_sunnybrook(cfg.data_root, size=NATIVE_SIZE, patients=TEST))
    query_mm = _pixel_spacing(cfg.data_root, TEST[0])
    query = ModelQuery(net, activation="softmax", device="cpu")
    ref = dice(A.GridQuery(query, (cfg.size, cfg.size)), x, y)
    rows = []
    for mm in PIPELINE_SPACINGS:
        d = dice(A.SpacingQuery(query, query_mm, mm, (cfg.size, cfg.size)), x, y)
        rows.append(swept_spacing_row(query, x, query_mm, mm, cfg, key, d, ref, shown))
    return rows


def pipeline_markdown(res: dict[str, Any]) -> str:
    """The query-pipeline table: transformation -> the watermarked model's Dice, ASR, p-value and wrong-key ASR,
    and the clean model's ASR."""
    st = res["setting"]
    by = {(r["model"], r["attack"]): r for r in res["rows"]}
    lines = [
        f"Query pipelines: {st['network']} at {st['size']}x{st['size']}, held-out patient {st['test']} "
        f"({st['n_images']} slices), trigger {st['trigger']} (size {st['trigger_size']}), direct read-out; "
        f"wrong-key ASR = the most any of {st['wrong_keys']} wrong keys decodes.",
        "",
        "| query transformation | Dice | ASR | p-value | wrong-key ASR | clean model ASR | removed |",
        "|---|---|---|---|---|---|---|",
    ]
    for (model, attack), r in by.items():
        if model != "watermarked":
            continue
        c = by.get(("clean", attack))
        lines.append(
            f"| {attack} | {r['clean_dice']:.4f} | {r['asr']:.3f} | {r['p_value']:.2g} | {r['extra']['wrong_key_asr']:.3f} | "
            f"{c['asr'] if c else float('nan'):.3f} | {'yes' if r['removed'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def formats_markdown(res: dict[str, Any]) -> str:
    """The deployment-format table: model x format -> clean Dice, ASR, bit accuracy, p-value, distance to torch."""
    st = res["setting"]
    lines = [
        f"Deployment formats: {st['network']} at {st['size']}x{st['size']}, held-out patient {st['test']} "
        f"({st['n_images']} slices), int8 calibrated on {st['calibration']} ({st['n_calibration']} slices), "
        f"onnxruntime {st['versions']['onnxruntime']} CPU, {st['threads']} threads.",
        "",
        "| model | format | clean Dice | ASR | bit accuracy | p-value | verdict | max / mean abs. prob. diff to torch | argmax agreement | ms / image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        e = r["extra"]
        lines.append(
            f"| {r['model']} | {r['attack']} | {r['clean_dice']:.4f} | {r['asr']:.3f} | {r['bit_accuracy']:.3f} | "
            f"{r['p_value']:.2g} | {'shown' if r['verdict'] else 'not shown'} | {e['max_prob_diff']:.2g} / "
            f"{e['mean_prob_diff']:.2g} | {e['argmax_agreement']:.5f} | {e['ms_per_image']:.1f} |"
        )
    shown = set()
    for r in res["rows"]:
        if "runtime_ops" in r["extra"] and r["attack"] not in shown:
            shown.add(r["attack"])
            ops = ", ".join(f"{k} {v}" for k, v in r["extra"]["runtime_ops"].items())
            lines += ["", f"onnxruntime's optimised graph for {r['attack']}: {ops}."]
    return "\n".join(lines) + "\n"


def attack_table(watermarked: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The attack x {clean Dice, ASR, p-value, verdict, removed} table in markdown."""
    w = watermarked
    lines = [
        f"Watermarked model: clean Dice {w['clean_dice']:.4f}, ASR {w['asr']:.3f}, p {w['p_value']:.2g}. "
        "'removed' = claim lost while clean Dice stays within 5 points.",
        "",
        "| attack | params | clean Dice | ASR | p-value | verdict | removed | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['attack']} | {r['params']} | {r['clean_dice']:.4f} | {r['asr']:.3f} | {r['p_value']:.2g} | "
            f"{'shown' if r['verdict'] else 'not shown'} | {'yes' if r['removed'] else 'no'} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def distillation_table(rows: list[dict[str, Any]]) -> str:
    """The distillation claim (the output mark) on the watermarked model's students and on the controls."""
    soft_row = next((r for r in rows if r["attack"] == "distill" and "controls" in r.get("extra", {})), None)
    if soft_row is None:
        return ""
    students = [r for r in rows if r["attack"] == "distill"]
    lines = [
        f"Distillation: the students ({soft_row['params']['steps']} steps on the suspect's answers to "
        f"{soft_row['params']['queries']} augmented unlabelled slices) are claimed through the output mark on the held-out "
        "clean slices; the distill rows' p-value is the mark's, their ASR the trigger's.",
        "",
        "| model | role | clean Dice | output-mark p | shown |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| watermarked -> {r['params']['student']} ({r['params']['outputs']}) | student of the watermarked model | "
              f"{r['clean_dice']:.4f} | {r['p_value']:.2g} | {'yes' if r['verdict'] else 'no'} |" for r in students]
    lines += [f"| {c['model']} | {c['role']} | {c['clean_dice']:.4f} | {c['p_value']:.2g} | {'yes' if c['shown'] else 'no'} |"
              for c in soft_row["extra"]["controls"]]
    return "\n".join(lines) + "\n"


def markdown(res: dict[str, Any]) -> str:
    rs = res["restoration"]
    lines = [
        "# Robustness of the watermark (Sunnybrook 2D, direct read-out, held-out patient SCD0000501)",
        "",
        attack_table(res["watermarked"], res["rows"]),
        distillation_table(res["rows"]),
        f"Persistence (fine-tuning at lr {rs['finetune']['lr']}): ASR by epoch "
        + ", ".join(f"{p['epoch']}: {p['asr']:.2f}" for p in res["persistence"]),
        "",
        f"Restoration: after {rs['finetune']['epochs']} epochs (drift {rs['finetune']['drift_l2']:.2f}, ASR "
        f"{rs['finetune']['asr']:.2f}), {rs['restored']['steps']} steps on the owner's clean data bring ASR to "
        f"{rs['restored']['asr']:.2f} (clean Dice {rs['restored']['clean_dice']:.4f}).",
        "",
    ]
    return "\n".join(lines)


def main(
    out: str, fast: bool = False, epochs: int = 20, distill_steps: int | None = None, overwrite_steps: int | None = None,
    formats: str | None = None, pipeline: str | None = None, **settings: Any,
) -> None:
    """Attack the watermarked model, measure persistence, restoration and the loss landscape; print the tables.

    With ``--formats RUN`` only the deployment formats are measured, on the models of a finished demo run
    (:func:`deployment_formats`); with ``--pipeline RUN`` only the query transformations of a clinical pipeline
    (:func:`query_pipelines`).

    Args:
        out: output folder (``watermarked.pt`` there is reused).
        fast: the CPU setting.
        epochs: fine-tuning epochs (attacks, persistence).
        distill_steps: student steps (default 2400 fast / 4800 full).
        overwrite_steps: the attacker's embedding steps (default 150 fast / 600 full).
        formats: a finished ``python -m experiments.sunnybrook`` run folder: measure its clean and watermarked
            models in torch and through onnxruntime fp32 / fp16 / int8 instead (``formats.json``, ``formats.md``).
        pipeline: a finished demo run folder: measure its models behind blur, resampling, noise, JPEG, flip TTA and
            queries at the slices' own grid instead (``pipeline.json``, ``pipeline.md``).
        **settings: the owner's training settings and recipe deviations, e.g. ``--steps 800``, ``--data DIR``,
            ``--cutmix-prob 0``, ``--margin-consistency 0``.
    """
    if formats is not None and pipeline is not None:
        raise UsageError("--formats and --pipeline each take a demo run: measure one at a time.")
    if formats is not None:
        print(formats_markdown(deployment_formats(formats, out, fast, **settings)))
        return
    if pipeline is not None:
        print(pipeline_markdown(query_pipelines(pipeline, out, fast, **settings)))
        return
    res = run(out, fast, epochs, distill_steps, overwrite_steps, **settings)
    print(markdown(res))


if __name__ == "__main__":
    raise SystemExit(cli(main))
