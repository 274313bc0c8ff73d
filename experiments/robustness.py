"""Robustness of the watermark on the Sunnybrook 2D setting: the attack suite, persistence under fine-tuning,
data-driven restoration and a loss-landscape plot.

    python -m experiments.robustness --fast --out runs/robustness

The owner trains the watermarked UNet on three patients (SCD0000101/201/301); the attacker owns a fourth
(SCD0000401) — disjoint from the owner's data — and every number is measured on the fifth (SCD0000501):
clean Dice of the attacked model and the black-box claim (direct read-out) on its triggered slices.
Writes ``robustness.json`` (rows ``{"attack", "params", "clean_dice", "asr", "p_value", "removed", "seconds"}``),
``robustness.md``, ``persistence.json`` and the plots ``persistence.png`` and ``landscape.png``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import DiceMetric

from monai_stealthmark import attacks as A
from monai_stealthmark.attacks._common import train_steps
from monai_stealthmark.data import DEFAULT_SUNNYBROOK_ROOT, load_sunnybrook
from experiments.sunnybrook import ExperimentConfig, build_network, experiment_key, train_model
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.losses import UncertaintyWatermarkLoss
from monai_stealthmark.key.geometry import WM_DARK, WM_LIGHT, qr_target_map
from monai_stealthmark.utils import atomic_write_bytes, atomic_write_json, atomic_write_text
from monai_stealthmark.verify import ModelQuery, trigger_batch, verify_ownership

OWNER = ["SCD0000101", "SCD0000201", "SCD0000301"]
ATTACKER = ["SCD0000401"]
TEST = ["SCD0000501"]


def _stack(samples):
    return torch.stack([s["image"] for s in samples]), torch.stack([s["label"] for s in samples])


def dice(model, images, labels) -> float:
    """Mean Dice of the LV class: ``model`` is a network (logits) or a black box returning probabilities."""
    with torch.no_grad():
        p = ModelQuery(model, activation="softmax", device="cpu")(images) if isinstance(model, torch.nn.Module) else model(images)
    pred = p.argmax(1, keepdim=True)
    dm = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
    dm(torch.cat([pred == 0, pred == 1], 1).float(), torch.cat([labels == 0, labels == 1], 1).float())
    return float(dm.aggregate())


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.dtype.is_floating_point])


def watermark_loss(model, images, labels, key) -> float:
    """The watermark loss on the owner's triggered images (what the landscape plot shows)."""
    x = trigger_batch(images, key)
    dark = qr_target_map(key, tuple(images.shape[2:])).to(images.device).float()
    wm = torch.where(dark > 0, float(WM_DARK), float(WM_LIGHT)).expand(images.shape[0], 1, *images.shape[2:])
    with torch.no_grad():
        return float(UncertaintyWatermarkLoss(key=key)(model(x), torch.cat([labels, wm], 1)))


def _plot_persistence(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
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
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _plot_landscape(grid, xs, ys, traj, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4))
    cs = ax.contourf(xs, ys, grid.T, levels=20, cmap="viridis")
    fig.colorbar(cs, label="watermark loss (owner's triggered data)")
    ax.plot(traj[:, 0], traj[:, 1], "w.-", label="fine-tuning path")
    ax.plot(traj[0, 0], traj[0, 1], "r*", ms=12, label="watermarked")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def run(
    out: str | Path,
    fast: bool = True,
    steps: int | None = None,
    data_root: str = str(DEFAULT_SUNNYBROOK_ROOT),
    epochs: int = 20,
    distill_steps: int | None = None,
    overwrite_steps: int | None = None,
    cutmix_prob: float | None = None,
    margin_consistency: float | None = None,
) -> dict[str, Any]:
    """Train (or reuse ``out/watermarked.pt``), attack, and write the tables and plots.

    Args:
        out: output folder.
        fast: the CPU setting.
        steps: owner's training steps (default: the experiment's setting).
        data_root: the sunnybrook folder.
        epochs: fine-tuning epochs of the attacks and of the persistence run.
        distill_steps: student steps (default 300 fast / 1500 full).
        overwrite_steps: attacker's embedding steps (default 150 fast / 600 full).
        cutmix_prob: the owner's CutMix share (default: the experiment's setting, see
            :class:`~experiments.sunnybrook.ExperimentConfig`).
        margin_consistency: the owner's margin-copy weight (default: the experiment's setting).
    """
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = ExperimentConfig(fast=fast, steps=steps, data_root=data_root, cutmix_prob=cutmix_prob, margin_consistency=margin_consistency)
    key = experiment_key(cfg)
    key.save(out / "key.json")
    samples = load_sunnybrook(data_root, size=cfg.size)
    owner = [s for s in samples if s["patient"] in OWNER]
    att_x, att_y = _stack([s for s in samples if s["patient"] in ATTACKER])
    test_x, test_y = _stack([s for s in samples if s["patient"] in TEST])
    own_x, own_y = _stack(owner)
    wm_path = out / "watermarked.pt"
    net = build_network(cfg.channels)
    if wm_path.is_file():
        net.load_state_dict(torch.load(wm_path, map_location="cpu"))
    else:
        ckpt = out / "ckpt"
        ckpt.mkdir(exist_ok=True)
        net = train_model(owner, cfg, key, torch.device("cpu"), ckpt)
        torch.save(net.state_dict(), wm_path)
    net = net.cpu().eval()

    def verify(m):
        return verify_ownership(ModelQuery(m, activation="softmax", device="cpu") if isinstance(m, torch.nn.Module) else m, test_x, key)

    def evaluate(m):
        return dice(m, test_x, test_y)

    ref_dice = dice(net, test_x, test_y)
    base = verify(net)
    rows = []

    def add(name, params, attack):
        r = A.run_attack(name, params, attack, evaluate, verify, ref_dice)
        r.removed = r.removed and base.verdict  # nothing to remove from a model whose claim failed already
        rows.append(r.to_dict())
        print(f"{name:28s} {str(params):40s} Dice {r.clean_dice:.4f}  ASR {r.asr:.3f}  p {r.p_value:.2g}  removed {r.removed}", flush=True)

    add("none", {}, lambda: net)
    ep = epochs
    add("finetune_all", {"epochs": ep, "lr": 1e-4}, lambda: A.finetune(net, att_x, att_y, epochs=ep, lr=1e-4))
    add("finetune_last", {"epochs": ep, "lr": 1e-4}, lambda: A.finetune(net, att_x, att_y, epochs=ep, lr=1e-4, layers="last"))
    add("reinit_head_finetune", {"epochs": ep, "lr": 1e-3}, lambda: A.finetune(net, att_x, att_y, epochs=ep, lr=1e-3, reinit=True))
    for amount in (0.1, 0.3, 0.5, 0.7, 0.9):
        add("global_prune", {"amount": amount}, lambda a=amount: A.global_magnitude_prune(net, a))
    add("global_prune_finetune", {"amount": 0.5, "epochs": 5, "lr": 1e-4}, lambda: A.finetune(A.global_magnitude_prune(net, 0.5), att_x, att_y, epochs=5, lr=1e-4))
    add("fine_pruning", {"amount": 0.5, "layers": 2, "epochs": 5}, lambda: A.finetune(A.channel_prune(net, att_x, 0.5), att_x, att_y, epochs=5, lr=1e-4))
    add("fp16", {}, lambda: A.CastQuery(net, torch.float16))
    add("bf16", {}, lambda: A.CastQuery(net, torch.bfloat16))
    add("int8_weights", {}, lambda: A.int8_weights(net))
    add("int8_static", {"calibration": "attacker slices"}, lambda: A.int8_static(net, att_x))
    add("torchscript_roundtrip", {}, lambda: A.torchscript_roundtrip(net, test_x[:1]))
    for s in (0.01, 0.05, 0.1):
        add("weight_noise", {"scale": s}, lambda s=s: A.weight_noise(net, s))
    teacher = ModelQuery(net, activation="softmax", device="cpu")
    d_steps = distill_steps or (300 if fast else 1500)
    for outputs, arch in (("soft", "unet"), ("soft", "basicunet"), ("hard", "unet")):
        def student(arch=arch, outputs=outputs):
            torch.manual_seed(1)
            return A.distill(teacher, build_network(cfg.channels, arch), att_x, steps=d_steps, outputs=outputs)

        add("distill", {"outputs": outputs, "student": arch, "steps": d_steps, "queries": int(att_x.shape[0] * 5)}, student)
    for name, make in A.INPUT_ATTACKS.items():
        add(f"input_{name}", {}, lambda make=make: A.InputTransformQuery(ModelQuery(net, activation="softmax", device="cpu"), make()))
    attacker_key = WatermarkKey.generate("ATTACKER:0001", seed=4242, tau=cfg.watermark()["key"]["tau"])
    ow_steps = overwrite_steps or (150 if fast else 600)
    overwritten = {}

    def do_overwrite():
        overwritten["m"] = A.overwrite(net, att_x, att_y, attacker_key, steps=ow_steps, lr=1e-4)
        return overwritten["m"]

    add("overwrite", {"steps": ow_steps, "lr": 1e-4}, do_overwrite)
    rows[-1]["extra"] = {"attacker_claim_asr": verify_ownership(ModelQuery(overwritten["m"], device="cpu"), test_x, attacker_key).asr}

    # persistence: ASR / Dice / drift epoch by epoch while fine-tuning on the attacker's data
    persist, traj = [], [_flat(net)]
    m = copy.deepcopy(net)
    w0 = _flat(net)
    lr_p = 1e-3  # a strong fine-tune, so that there is something to restore
    for e in range(ep + 1):
        if e > 0:
            m = train_steps(m, att_x, att_y, steps=-(-att_x.shape[0] // 8), lr=lr_p, seed=e)
            traj.append(_flat(m))
        rep = verify(m)
        persist.append({"epoch": e, "asr": rep.asr, "p_value": rep.p_value, "clean_dice": dice(m, test_x, test_y), "drift_l2": float((_flat(m) - w0).norm())})
    _plot_persistence(persist, out / "persistence.png")
    # restoration: a short training on the owner's clean data only (no trigger)
    restored = train_steps(copy.deepcopy(m), own_x, own_y, steps=30, lr=1e-4, seed=99)
    rep_r = verify(restored)
    restoration = {
        "finetune": {"epochs": ep, "lr": lr_p, "asr": persist[-1]["asr"], "drift_l2": persist[-1]["drift_l2"]},
        "restored": {"steps": 30, "lr": 1e-4, "data": "owner's clean training slices", "asr": rep_r.asr, "p_value": rep_r.p_value, "clean_dice": dice(restored, test_x, test_y)},
    }
    # loss landscape over the first two principal directions of the fine-tuning trajectory
    T = torch.stack(traj) - w0
    _, _, V = torch.pca_lowrank(T, q=2, center=False)
    coords = (T @ V).numpy()
    span = max(np.abs(coords).max() * 1.3, 1e-3)
    xs = ys = np.linspace(-span, span, 9 if fast else 17)
    keys = [k for k, v in net.state_dict().items() if v.dtype.is_floating_point]
    shapes = [net.state_dict()[k].shape for k in keys]
    probe = copy.deepcopy(net)
    grid = np.zeros((len(xs), len(ys)))
    sd = probe.state_dict()
    for i, a in enumerate(xs):
        for j, b in enumerate(ys):
            flat = w0 + a * V[:, 0] + b * V[:, 1]
            off = 0
            for k, s in zip(keys, shapes):
                n = int(np.prod(s))
                sd[k] = flat[off : off + n].view(s)
                off += n
            probe.load_state_dict(sd)
            grid[i, j] = watermark_loss(probe.eval(), own_x[:16], own_y[:16], key)
    _plot_landscape(grid, xs, ys, coords, out / "landscape.png")

    res = {
        "setting": {"owner": OWNER, "attacker": ATTACKER, "test": TEST, "steps": cfg.steps, "fast": fast, "device": "cpu"},
        "watermarked": {"clean_dice": ref_dice, "asr": base.asr, "p_value": base.p_value},
        "rows": rows,
        "persistence": persist,
        "restoration": restoration,
        "seconds": time.perf_counter() - t_start,
    }
    atomic_write_json(out / "robustness.json", rows)
    atomic_write_json(out / "persistence.json", {k: res[k] for k in ("setting", "watermarked", "persistence", "restoration", "seconds")})
    atomic_write_text(out / "robustness.md", markdown(res))
    return res


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


def markdown(res: dict[str, Any]) -> str:
    rs = res["restoration"]
    lines = [
        "# Robustness of the watermark (Sunnybrook 2D, direct read-out, held-out patient SCD0000501)",
        "",
        attack_table(res["watermarked"], res["rows"]),
        f"Persistence (fine-tuning at lr {rs['finetune']['lr']}): ASR by epoch "
        + ", ".join(f"{p['epoch']}: {p['asr']:.2f}" for p in res["persistence"]),
        "",
        f"Restoration: after {rs['finetune']['epochs']} epochs (drift {rs['finetune']['drift_l2']:.2f}, ASR "
        f"{rs['finetune']['asr']:.2f}), {rs['restored']['steps']} steps on the owner's clean data bring ASR to "
        f"{rs['restored']['asr']:.2f} (clean Dice {rs['restored']['clean_dice']:.4f}).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fast", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--data", default=str(DEFAULT_SUNNYBROOK_ROOT))
    p.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs (attacks, persistence)")
    p.add_argument("--distill-steps", type=int, default=None)
    p.add_argument("--overwrite-steps", type=int, default=None)
    p.add_argument("--cutmix-prob", type=float, default=None, help="owner's CutMix share (default: the demo's)")
    p.add_argument("--margin-consistency", type=float, default=None, help="owner's margin-copy weight (default: the demo's)")
    a = p.parse_args(argv)
    res = run(a.out, a.fast, a.steps, a.data, a.epochs, a.distill_steps, a.overwrite_steps, a.cutmix_prob, a.margin_consistency)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
