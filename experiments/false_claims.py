"""False claims: an optimising accuser against independent clean models and the owner's model, with and without the
verification protocol.

    python -m experiments.false_claims --fast --out runs/false_claims \
        --owner-model runs/demo/watermarked.pt --owner-key runs/demo/key.json

The accuser trains two clean surrogates of their own (white box) and attacks with
:mod:`monai_stealthmark.attacks.false_claim`: (a) adversarial images optimised so that the surrogates' uncertainty
spells the accuser's QR, (b) a universal forged trigger pattern per trigger kind. Targets: five independently
trained clean models (other seeds and architectures) and, when given, the owner's watermarked model (claimed with
the accuser's key, not the owner's). The referee's clean images are the held-out patient's slices; the accuser's
images come from the training patients. Reported per target: decodes of the accuser's payload, bit agreement,
binomial p-value, verdict, for

* no protocol: the accuser's own queries, read as they are;
* the protocol: the referee's images triggered by the public function from a committed key (the forged pattern
  through its nearest seed), plus what the adversarial images would give if a referee accepted them, with the
  p-value calibrated in a null of the other clean models on the same images;
* direct-mode trials: random accuser keys x models x referee-chosen image subsets, false claims with their
  one-sided 95 % Clopper-Pearson bound;

and the owner's own claim. Writes ``DIR/false_claims.json`` and ``DIR/false_claims.md``; the models are kept in
``DIR/models/`` and reused by a rerun with the same settings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments import UsageError, cli, phase, progress
from experiments.sunnybrook import ExperimentConfig, build_network, load_or_train
from monai_stealthmark.attacks.false_claim import (
    ProtocolError,
    claim_summary,
    false_claim_upper_bound,
    forge_trigger,
    nearest_seeds,
    optimise_images,
    protocol_claim,
    random_accuser_keys,
    read_submitted_queries,
    stamp_forged,
)
from monai_stealthmark.data import DEFAULT_SUNNYBROOK_ROOT, load_sunnybrook, split_by_patient
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.utils import atomic_write_json, atomic_write_text
from monai_stealthmark.verify import Commitment, ModelQuery, NullDistribution, VerificationReport, trigger_batch, verify_ownership, vote_agreement

__all__ = ["SURROGATES", "TARGETS", "train_models", "load_owner", "main"]

REFEREE_PATIENT = "SCD0000501"
SUSPECT_DATE = "2026-06-01"  # the accuser's keys are committed before it (2026-01-01): the strongest accuser
ALPHA = 1e-6
# (name, arch, seed, unet channels): the accuser's surrogates and the independently trained clean targets
SURROGATES = (("surrogate_unet_s100", "unet", 100, (8, 16, 32, 64)), ("surrogate_attentionunet_s101", "attentionunet", 101, (8, 16, 32, 64)))
TARGETS = (
    ("unet_s200", "unet", 200, (8, 16, 32, 64)),
    ("unet_wide_s201", "unet", 201, (16, 32, 64, 128)),
    ("unet_deep_s202", "unet", 202, (8, 16, 32, 64, 128)),
    ("attentionunet_s203", "attentionunet", 203, (8, 16, 32, 64)),
    ("basicunet_s204", "basicunet", 204, None),
)


def _config(arch: str, seed: int, channels: tuple[int, ...] | None, steps: int, batch_size: int, data: str) -> ExperimentConfig:
    cfg = ExperimentConfig(fast=True, steps=steps, batch_size=batch_size, seed=seed, arch=arch, data_root=data)
    if channels is not None:
        cfg.channels = channels
    return cfg


def train_models(spec, train: list[dict], out: Path, steps: int, batch_size: int, data: str) -> dict[str, torch.nn.Module]:
    """Train (or reuse from ``out/models``) one clean model per ``(name, arch, seed, channels)`` of ``spec``.

    Raises:
        UsageError: a saved model whose recorded settings differ from the requested ones.
    """
    models = {}
    for name, arch, seed, channels in spec:
        cfg = _config(arch, seed, channels, steps, batch_size, data)
        path = out / "models" / f"{name}.pt"
        settings = {"arch": arch, "seed": seed, "channels": list(cfg.channels), "steps": steps, "batch_size": batch_size}
        rec = path.with_suffix(".settings.json")
        if path.is_file() and rec.is_file() and json.loads(rec.read_text()) != settings:
            raise UsageError(f"{path} was trained with other settings ({rec.read_text().strip()}); use another --out.")
        path.parent.mkdir(parents=True, exist_ok=True)
        models[name] = load_or_train(path, train, cfg, None, torch.device("cpu"), out / "models" / f"ckpt_{name}", settings)
    return models


def load_owner(model_path: str, key_path: str) -> tuple[torch.nn.Module, WatermarkKey]:
    """The owner's watermarked network (a state dict saved by ``experiments.sunnybrook``, built from the settings
    file beside it) and the owner's key."""
    path = Path(model_path)
    if not path.is_file():
        raise UsageError(f"--owner-model {model_path!r} does not exist.")
    rec = path.with_suffix(".settings.json")
    settings = json.loads(rec.read_text()) if rec.is_file() else {}
    net = build_network(tuple(settings.get("channels", (16, 32, 64, 128, 256))), settings.get("arch", "unet"))
    net.load_state_dict(torch.load(path, map_location="cpu"))
    return net.eval(), WatermarkKey.load(key_path)


def _floats(values: Any) -> list[float]:
    """An option given as one number or as a list of numbers."""
    return [float(v) for v in (values if isinstance(values, (tuple, list)) else [values])]


def _queries(models: dict[str, torch.nn.Module]) -> dict[str, ModelQuery]:
    return {n: ModelQuery(m, activation="softmax", device="cpu") for n, m in models.items()}


def _commitment(key: WatermarkKey) -> Commitment:
    return Commitment.for_key(key, key.created_at)


def _claims_on(queries: dict[str, ModelQuery], images: torch.Tensor, key: WatermarkKey, referee: torch.Tensor) -> dict[str, Any]:
    """The protocol's claim with ``key`` on the referee's images against every model."""
    return {
        n: claim_summary(protocol_claim(q, images, key, referee, _commitment(key), SUSPECT_DATE))
        for n, q in queries.items()
    }


def _calibrated(reports: dict[str, VerificationReport], clean: list[str], key: WatermarkKey) -> dict[str, Any]:
    """Each claim's summary with its p-value placed in a null of the *other* clean models on the same queries."""
    agree = {n: vote_agreement(r.modules, key) for n, r in reports.items()}
    out = {}
    for n, r in reports.items():
        others = [m for m in clean if m != n]
        null = NullDistribution(key.fingerprint, [agree[m] for m in others], others, r.n_images)
        s = claim_summary(r)
        place = null.place(r.modules, key)
        s.update(p_calibrated=place["p_gaussian"], z=place["z"], verdict_calibrated=bool(r.verdict and place["p_gaussian"] <= ALPHA))
        out[n] = s
    return out


def _image_attack(surr, queries, clean, key, attack_images, referee, eps, steps, max_shift, seed) -> dict[str, Any]:
    """Attack (a) at one budget: the optimised images as hand-made queries, refused by the protocol, and what they
    would give if accepted (with the calibrated p-value)."""
    t0 = time.perf_counter()
    adv = optimise_images(list(surr.values()), attack_images, key, steps=steps, eps=eps, max_shift=max_shift, seed=seed)
    res: dict[str, Any] = {"eps": eps, "steps": steps, "seconds": time.perf_counter() - t0,
                           "linf": float((adv - attack_images).abs().amax())}
    handmade = trigger_batch(adv, key)
    res["no_protocol"] = {n: read_submitted_queries(q, handmade, key) for n, q in queries.items()}
    try:
        protocol_claim(next(iter(queries.values())), adv, key, referee)
        res["protocol_refused"] = False
    except ProtocolError as e:
        res["protocol_refused"], res["refusal"] = True, str(e)
    reports = {n: verify_ownership(q, adv, key, commitment=_commitment(key), suspect_date=SUSPECT_DATE) for n, q in queries.items()}
    res["if_accepted"] = _calibrated(reports, clean, key)
    return res


def _forgery(surr, queries, key, attack_images, referee, steps, n_seeds, max_shift, seed) -> dict[str, Any]:
    """Attack (b) for one trigger kind: the forged pattern stamped by hand, then the nearest keys it can be claimed
    with under the protocol."""
    t0 = time.perf_counter()
    forged = forge_trigger(list(surr.values()), attack_images, key, steps=steps, max_shift=max_shift, seed=seed)
    res: dict[str, Any] = {"kind": key.trigger, "amplitude": key.trigger_amplitude, "steps": steps, "seconds": time.perf_counter() - t0}
    handmade = stamp_forged(referee, forged).detach()
    res["no_protocol"] = {n: read_submitted_queries(q, handmade, key) for n, q in queries.items()}
    spatial = tuple(int(v) for v in referee.shape[2:])
    rng = np.random.default_rng(seed)
    nearest = nearest_seeds(forged, (int(s) for s in rng.integers(0, 2**62, n_seeds)), spatial, top=3)
    res["seeds_searched"] = n_seeds
    res["nearest"] = [{"seed": s, "similarity": sim} for s, sim in nearest]
    best = key.replace(trigger_seed=nearest[0][0])
    res["protocol_nearest_key"] = _claims_on(queries, referee, best, referee)
    return res


def _trials(queries: dict[str, ModelQuery], referee: torch.Tensor, n_keys: int, subsets: int, subset_size: int, seed: int) -> dict[str, Any]:
    """Random accuser keys x models x referee-chosen image subsets, each a protocol claim in direct mode."""
    kinds = ("patch", "keyed_patch", "noise", "lowfreq")
    keys = random_accuser_keys(n_keys, seed, kinds=kinds)
    gen = torch.Generator().manual_seed(seed)
    counts = {"trials": 0, "false_claims": 0, "any_decode": 0, "vote_decodes": 0, "p_below_alpha": 0}
    per_model = {n: dict.fromkeys(counts, 0) for n in queries}
    best_p, best_bits = 1.0, 0.0
    bar = progress(total=n_keys * len(queries) * subsets, desc="trials", unit="trial")
    for key in keys:
        commit = _commitment(key)
        for name, q in queries.items():
            for _ in range(subsets):
                idx = torch.randperm(referee.shape[0], generator=gen)[:subset_size]
                r = protocol_claim(q, referee[idx], key, referee, commit, SUSPECT_DATE)
                s = claim_summary(r)
                for c in (counts, per_model[name]):
                    c["trials"] += 1
                    c["false_claims"] += int(s["verdict"])
                    c["any_decode"] += int(s["decodes"] > 0)
                    c["vote_decodes"] += int(s["vote_decoded"])
                    c["p_below_alpha"] += int(s["p_value"] <= ALPHA)
                best_p, best_bits = min(best_p, s["p_value"]), max(best_bits, s["bit_accuracy"])
                bar.update(1)
    bar.close()
    n = counts["trials"]
    return {
        **counts, "keys": n_keys, "kinds": list(kinds), "subsets_per_key_model": subsets, "subset_size": subset_size,
        "upper_bound_95": {k: false_claim_upper_bound(counts[k], n) for k in ("false_claims", "any_decode", "p_below_alpha")},
        "smallest_p_value": best_p, "highest_bit_accuracy": best_bits, "per_model": per_model,
    }


def _owner_claim(owner: torch.nn.Module, key: WatermarkKey, referee: torch.Tensor) -> dict[str, Any]:
    return claim_summary(verify_ownership(ModelQuery(owner, activation="softmax", device="cpu"), referee, key))


def _row(name: str, s: dict[str, Any]) -> str:
    cal = f" | {s['p_calibrated']:.3g}" if "p_calibrated" in s else " | "
    return (f"| {name} | {s['decodes']}/{s['n_images']} | {s['bit_accuracy']:.3f} | {s['p_value']:.3g}{cal} | "
            f"{'yes' if s['verdict'] else 'no'} |")


def _table(title: str, rows: dict[str, dict[str, Any]]) -> list[str]:
    head = [f"**{title}**", "", "| model | decodes | bit agreement | p-value | calibrated p | verdict |", "|---|---|---|---|---|---|"]
    return head + [_row(n, s) for n, s in rows.items()] + [""]


def to_markdown(res: dict[str, Any]) -> str:
    """The measured tables: per attack and target, the trials with their bound, the owner's claim."""
    lines = [f"# False claims ({res['setting']})", "",
             f"Accuser key payload {res['accuser_payload']!r}; referee images: {res['n_referee_images']} slices of "
             f"{REFEREE_PATIENT}; accuser images: {res['n_attack_images']} slices of the training patients.", ""]
    for a in res["image_attacks"]:
        tag = f"(a) adversarial images, eps {a['eps']}, {a['steps']} steps"
        lines += _table(f"{tag}: no protocol (the accuser's own queries)", a["no_protocol"])
        lines += [f"Protocol: {'refused' if a['protocol_refused'] else 'ACCEPTED'} (not the referee's images).", ""]
        lines += _table(f"{tag}: if a referee accepted them as clean images (null: the other clean models)", a["if_accepted"])
    for f in res["forgeries"]:
        tag = f"(b) forged {f['kind']} trigger (amplitude {f['amplitude']}), {f['steps']} steps"
        lines += _table(f"{tag}: no protocol (hand-stamped on the referee's images)", f["no_protocol"])
        near = ", ".join(f"{n['similarity']:.3f}" for n in f["nearest"])
        lines += [f"Nearest keys over {f['seeds_searched']} seeds: similarity {near}.", ""]
        lines += _table(f"{tag}: protocol, the nearest key", f["protocol_nearest_key"])
    lines += _table("protocol: the accuser's committed key on the referee's images", res["protocol_accuser_key"])
    t = res["trials"]
    ub = t["upper_bound_95"]
    lines += ["**Direct-mode trials under the protocol**", "",
              f"{t['trials']} trials ({t['keys']} random keys of kinds {', '.join(t['kinds'])} x {len(t['per_model'])} "
              f"models x {t['subsets_per_key_model']} referee subsets of {t['subset_size']} images): false claims "
              f"{t['false_claims']} (95 % upper bound {ub['false_claims']:.2e}); trials with any decode "
              f"{t['any_decode']} (bound {ub['any_decode']:.2e}); p <= 1e-6 {t['p_below_alpha']} (bound "
              f"{ub['p_below_alpha']:.2e}); smallest p {t['smallest_p_value']:.3g}, highest bit agreement "
              f"{t['highest_bit_accuracy']:.3f}.", ""]
    if res.get("owner_claim"):
        o = res["owner_claim"]
        lines += [f"**Owner's claim** (owner key, {o['n_images']} referee images): ASR {o['asr']:.3f}, bits "
                  f"{o['bit_accuracy']:.3f}, p {o['p_value']:.3g}, verdict {'shown' if o['verdict'] else 'not shown'}.", ""]
    lines += [f"{res['seconds']:.0f} s on {res['device']}."]
    return "\n".join(lines) + "\n"


def main(
    out: str,
    fast: bool = False,
    owner_model: str | None = None,
    owner_key: str | None = None,
    data: str = str(DEFAULT_SUNNYBROOK_ROOT),
    train_steps: int | None = None,
    attack_steps: int | None = None,
    eps: tuple = (0.3, 1.0),
    forge_kinds: tuple = ("noise",),
    forge_amplitude: float = 1.0,
    max_shift: int = 0,
    seeds_searched: int | None = None,
    trial_keys: int | None = None,
    subsets: int = 3,
    subset_size: int = 8,
    attack_images: int = 8,
    threads: int = 1,
    seed: int = 0,
) -> None:
    """Train the accuser's surrogates and the clean targets, run both attacks, the protocol's claims and the trials.

    Args:
        out: output folder (``false_claims.json``, ``false_claims.md``, ``models/``).
        fast: the CPU setting (150 training steps of 8, small channels; fewer attack steps, seeds and trials).
        owner_model: the owner's watermarked state dict (``experiments.sunnybrook``'s ``watermarked.pt``).
        owner_key: the owner's key file (with ``owner_model``).
        data: the Sunnybrook folder.
        train_steps: training steps per clean model (default 150 fast, 1600 otherwise).
        attack_steps: Adam steps of the image attack and the forgery (default 100 fast, 500 otherwise).
        eps: L-infinity budgets of the image attack, relative to each image's intensity range.
        forge_kinds: trigger kinds to forge a universal pattern for.
        forge_amplitude: the forged blended triggers' amplitude (the accuser chooses it in their key).
        seeds_searched: seeds searched for the forged pattern's nearest key (default 20000 fast, 200000 otherwise).
        trial_keys: random accuser keys of the trials (default 50 fast, 200 otherwise).
        subsets: referee-chosen image subsets per key and model.
        subset_size: images per subset.
        attack_images: training-patient slices the accuser optimises.
        max_shift: input diversity of both attacks: random circular shift in pixels (0: gain and noise only).
        threads: torch CPU threads.
        seed: seed of the accuser's key, the attacks, the seed search and the trials.
    """
    t0 = time.perf_counter()
    torch.set_num_threads(int(threads))
    if (owner_model is None) != (owner_key is None):
        raise UsageError("--owner-model and --owner-key go together.")
    train_steps = train_steps or (150 if fast else 1600)
    attack_steps = attack_steps or (100 if fast else 500)
    seeds_searched = seeds_searched or (20000 if fast else 200000)
    trial_keys = trial_keys or (50 if fast else 200)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    phase(f"loading the Sunnybrook slices from {data}")
    train, held = split_by_patient(load_sunnybrook(data, size=128), [REFEREE_PATIENT])
    referee = torch.stack([s["image"] for s in held]).float()
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:attack_images]
    own_images = torch.stack([train[int(i)]["image"] for i in pick]).float()
    phase("training the accuser's surrogates and the clean targets")
    batch = 8 if fast else 24
    surr = train_models(SURROGATES, train, out_dir, train_steps, batch, data)
    targets = train_models(TARGETS, train, out_dir, train_steps, batch, data)
    models = {**surr, **targets}
    owner = None
    if owner_model is not None:
        owner, okey = load_owner(owner_model, owner_key)
        models["owner_watermarked"] = owner
    queries = _queries(models)
    key = random_accuser_keys(1, seed + 1)[0]
    res: dict[str, Any] = {"setting": "fast" if fast else "full", "accuser_payload": key.payload, "n_referee_images": int(referee.shape[0]),
                           "n_attack_images": int(own_images.shape[0]), "train_steps": train_steps, "models": list(models)}
    res["image_attacks"] = []
    for e in _floats(eps):
        phase(f"(a) optimising {attack_images} adversarial images, eps {e}")
        res["image_attacks"].append(_image_attack(surr, queries, list(targets), key, own_images, referee, e, attack_steps, max_shift, seed))
    res["forgeries"] = []
    train_images = torch.stack([s["image"] for s in train]).float()
    for kind in ([forge_kinds] if isinstance(forge_kinds, str) else list(forge_kinds)):
        phase(f"(b) forging a universal {kind} trigger and searching {seeds_searched} seeds for its nearest key")
        fkey = key.replace(trigger=kind, trigger_amplitude=float(forge_amplitude))
        res["forgeries"].append(_forgery(surr, queries, fkey, train_images, referee, attack_steps, seeds_searched, max_shift, seed))
    phase("the accuser's committed key on the referee's images")
    res["protocol_accuser_key"] = _claims_on(queries, referee, key, referee)
    phase("direct-mode trials under the protocol")
    res["trials"] = _trials(queries, referee, trial_keys, subsets, subset_size, seed + 2)
    if owner is not None:
        phase("the owner's own claim")
        res["owner_claim"] = _owner_claim(owner, okey, referee)
    res["seconds"] = time.perf_counter() - t0
    res["device"] = f"cpu ({torch.get_num_threads()} threads)"
    atomic_write_json(out_dir / "false_claims.json", res)
    md = to_markdown(res)
    atomic_write_text(out_dir / "false_claims.md", md)
    print(md)


if __name__ == "__main__":
    raise SystemExit(cli(main))
