"""Does a student distilled from the watermarked model carry the owner's output mark, and do students of a clean
model and independently trained clean models stay clear of it?

    python -m experiments.distillation --run runs/sunnybrook --out runs/distillation --independent-seeds 1,2,3

``--run`` is a finished ``python -m experiments.sunnybrook`` run (the recipe's output mark on, as by default); its
clean model is the clean teacher. The attacker queries each teacher with the
unlabelled slices of the four non-test patients (flipped and intensity-scaled copies included) and trains students
on the answers: soft outputs into a UNet and a BasicUNet, hard masks into a UNet
(:func:`monai_stealthmark.attacks.distill`). ``--independent-seeds`` trains clean models of the run's setting at
other seeds (kept in ``--out``, reused when there). Every model — teachers, students and independent clean models —
is then tested for the key's output mark with the held-out patient's clean
slices (:func:`monai_stealthmark.verify.detect_output_mark`) and for the trigger watermark (direct read-out).
Writes ``distillation.json`` and ``distillation.md``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from experiments import UsageError, cli, phase
from experiments.robustness import Distillation, Split, clean_model, dice, distil, load_demo_run
from experiments.sunnybrook import make_config
from monai_stealthmark.data import load_sunnybrook, split_by_patient
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.utils import atomic_write_json, atomic_write_text
from monai_stealthmark.verify import ModelQuery, detect_output_mark, verify_ownership

STUDENTS = (("soft", "unet"), ("soft", "basicunet"), ("hard", "unet"))  # (teacher outputs, student network)


def _measure(net: torch.nn.Module, split: Split, key: WatermarkKey) -> dict[str, Any]:
    """Clean Dice on the held-out slices, the output-mark test on them, and the trigger watermark's ASR and p."""
    q = ModelQuery(net, activation="softmax", device="cpu")
    report = verify_ownership(q, split.test_x, key)
    return {"clean_dice": dice(q, split.test_x, split.test_y), "output_mark": detect_output_mark(q, split.test_x, key).to_dict(),
            "asr": report.asr, "trigger_p_value": report.p_value}


def measure_distillation(run_dir: str | Path, out: str | Path, independent_seeds: list[int] | tuple[int, ...] = (),
        student_steps: int = 2400, fast: bool = True, **settings: Any) -> dict[str, Any]:
    """Measure the teachers, their students and the independent clean models; write the JSON and the table."""
    t_start = time.perf_counter()
    run_dir, out = Path(run_dir), Path(out)
    make_config(fast, **settings)  # an unknown setting is refused before the run is read
    cfg, key, teachers = load_demo_run(run_dir, "--run", fast, settings)
    if cfg.seed in independent_seeds:
        raise UsageError(f"--independent-seeds: seed {cfg.seed} is the run's own seed; name other seeds.")
    out.mkdir(parents=True, exist_ok=True)
    split = Split.load(cfg.data_root, cfg.size)
    rows = []
    for name, net in teachers.items():
        phase(f"{name} teacher")
        rows.append({"model": name, "role": "teacher", **_measure(net, split, key)})
        for outputs, arch in STUDENTS:
            phase(f"student of the {name} model: {arch} on {outputs} outputs, {student_steps} steps")
            t0 = time.perf_counter()
            student = distil(net, Distillation(split.query_x, student_steps, cfg.channels), outputs, arch)
            rows.append({"model": f"{name} -> {arch} ({outputs})", "role": "student", "teacher": name, "outputs": outputs,
                         "student": arch, "steps": student_steps, "seconds": time.perf_counter() - t0, **_measure(student, split, key)})
    if independent_seeds:
        samples = load_sunnybrook(cfg.data_root, size=cfg.size, patients=cfg.patients)
        train, _ = split_by_patient(samples, [cfg.test_patient])
    for seed in independent_seeds:
        phase(f"independent clean model, seed {seed}")
        rows.append({"model": f"clean, seed {seed}", "role": "independent",
                     **_measure(clean_model(cfg, int(seed), train, out), split, key)})
    res = {
        "setting": {"run": str(run_dir), "test_images": int(split.test_x.shape[0]), "queries": int(split.query_x.shape[0]),
                    "student_steps": student_steps, "key_fingerprint": key.fingerprint, "alpha": rows[0]["output_mark"]["alpha"]},
        "rows": rows, "seconds": time.perf_counter() - t_start,
    }
    atomic_write_json(out / "distillation.json", res)
    atomic_write_text(out / "distillation.md", markdown(res))
    return res


def markdown(res: dict[str, Any]) -> str:
    """One row per model: its role, clean Dice, the output-mark test (t, p, verdict) and the trigger ASR."""
    st = res["setting"]
    lines = [
        (f"Output mark on the held-out patient's {st['test_images']} clean slices (claim at p <= {st['alpha']:g}); "
         f"students: {st['student_steps']} steps on the teacher's answers to {st['queries']} unlabelled slices "
         "(x5 augmented)."),
        "",
        "| model | role | clean Dice | mark t | mark p | mark shown | trigger ASR |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        fp = r["output_mark"]
        lines.append(f"| {r['model']} | {r['role']} | {r['clean_dice']:.4f} | {fp['t']:.1f} | {fp['p_value']:.2g} | "
                     f"{'yes' if fp['verdict'] else 'no'} | {r['asr']:.3f} |")
    return "\n".join(lines) + "\n"


def main(run: str, out: str, independent_seeds: list[int] | tuple[int, ...] = (), student_steps: int = 2400, fast: bool = True,
         **settings: Any) -> None:
    """Distil students from a demo run's two models and test every model for the key's output mark.

    Args:
        run: a finished ``python -m experiments.sunnybrook`` run (``watermarked.pt``, ``clean.pt``, ``key.json``).
        out: output folder for ``distillation.json`` and ``distillation.md``.
        independent_seeds: seeds of independently trained clean models (comma-separated), other than the run's.
        student_steps: student optimisation steps.
        fast: the CPU setting of the run.
        **settings: run settings overriding the recorded ones.
    """
    seeds = [independent_seeds] if isinstance(independent_seeds, int) else list(independent_seeds)
    print(markdown(measure_distillation(run, out, seeds, student_steps, fast, **settings)))


if __name__ == "__main__":
    raise SystemExit(cli(main))
