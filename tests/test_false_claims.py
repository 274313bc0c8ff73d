"""The false-claim adversary works on its own surrogates, and the protocol leaves it nothing to claim."""

from __future__ import annotations

import pytest
import torch
from helpers import KEY, TriggerOracle, images, tiny_unet

from monai_stealthmark.attacks import (
    ForgedTrigger,
    ProtocolError,
    check_referee_images,
    false_claim_upper_bound,
    forge_trigger,
    nearest_seeds,
    optimise_images,
    protocol_claim,
    random_accuser_keys,
    read_submitted_queries,
    stamp_forged,
    trigger_canvas,
    uncertainty_loss,
)
from monai_stealthmark.key.geometry import PATCH_KINDS, _pattern, patch_position
from monai_stealthmark.verify import ModelQuery, trigger_batch

SIZE = 88  # 29 modules over 88 pixels: about 3 pixels per module, a multiple of 4 for the tiny UNets
ACCUSER = random_accuser_keys(1, seed=5)[0]


def _query(model):
    return ModelQuery(model, activation="softmax", device="cpu")


def test_adversary_spells_its_qr_on_its_surrogates():
    """White-box Adam on the pixels through the public trigger: both surrogates decode the accuser's payload."""
    surrogates = [tiny_unet(0), tiny_unet(1)]
    x = images(1, SIZE)
    adv = optimise_images(surrogates, x, ACCUSER, steps=120, eps=0.5, lr=0.1, max_shift=0, gain=0.0, noise=0.0)
    assert (adv - x).abs().max() <= 0.5 * 1.0 + 1e-5  # images of range ~[0, 0.9]: within eps of it
    for m in surrogates:
        claim = read_submitted_queries(_query(m), trigger_batch(adv, ACCUSER), ACCUSER)
        assert claim["decodes"] == 1 and claim["verdict"], claim
    before = read_submitted_queries(_query(surrogates[0]), trigger_batch(x, ACCUSER), ACCUSER)
    assert before["decodes"] == 0 and not before["verdict"]


def test_forged_trigger_lowers_the_accuser_loss():
    """The universal pattern optimisation makes the surrogates' uncertainty closer to the accuser's QR."""
    key = ACCUSER.replace(trigger="noise", trigger_amplitude=0.5)
    surrogates = [tiny_unet(0)]
    x = images(4, SIZE)
    start = ForgedTrigger(torch.zeros(SIZE, SIZE), key)
    forged = forge_trigger(surrogates, x, key, steps=30, lr=0.1, batch_size=4, max_shift=0, gain=0.0, noise=0.0)
    with torch.no_grad():
        before = uncertainty_loss(surrogates, stamp_forged(x, start), key)
        after = uncertainty_loss(surrogates, stamp_forged(x, forged), key)
    assert forged.pattern.shape == (SIZE, SIZE) and forged.pattern.abs().max() <= 1
    assert after < 0.8 * before


def _patch_of(canvas: torch.Tensor, key) -> torch.Tensor:
    """The patch a patch-kind key stamps, cut from its canvas."""
    s = _pattern(key.trigger_seed, key.trigger, (SIZE, SIZE), key.trigger_size).shape[0]
    r, c = patch_position(key.trigger_seed, key.trigger, (SIZE, SIZE), s)
    return canvas[r : r + s, c : c + s]


@pytest.mark.parametrize("kind", ["patch", "keyed_patch", "blocks", "noise", "lowfreq"])
def test_a_seeds_own_pattern_stamps_as_the_public_function(kind):
    """A forged trigger that happens to be a seed's pattern is stamped exactly as the verifier stamps the key."""
    key = KEY.replace(trigger=kind)
    x = images(3, SIZE)
    canvas = trigger_canvas(key, (SIZE, SIZE))[0]
    if kind in PATCH_KINDS:
        pattern = _patch_of(canvas, key)
    else:
        pattern = canvas / key.trigger_amplitude
    torch.testing.assert_close(stamp_forged(x, ForgedTrigger(pattern, key)), trigger_batch(x, key), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind, runner_up", [("keyed_patch", 0.6), ("blocks", 0.8), ("noise", 0.1), ("lowfreq", 0.9)])
def test_nearest_seed_search_finds_only_the_generating_seed(kind, runner_up):
    """Searching seeds for a pattern: its own seed scores 1, every other seed less. A low-frequency trigger has
    few degrees of freedom (a 4x4 grid upsampled), so other seeds come closer to it than to a noise pattern."""
    key = KEY.replace(trigger=kind)
    canvas = trigger_canvas(key, (SIZE, SIZE))[0]
    pattern = _patch_of(canvas, key) if kind in PATCH_KINDS else canvas / key.trigger_amplitude
    seeds = list(range(1000, 1300)) + [key.trigger_seed]
    best = nearest_seeds(ForgedTrigger(pattern, key), seeds, (SIZE, SIZE), top=2)
    assert best[0][0] == key.trigger_seed and best[0][1] == pytest.approx(1.0, abs=1e-4)
    assert best[1][1] < runner_up


def test_protocol_refuses_hand_made_queries():
    """Only the referee's own clean images are accepted; an optimised or edited image is refused before any query."""
    referee = images(4, SIZE)
    check_referee_images(referee[[2, 0]], referee)  # any subset, any order
    edited = referee[:2].clone()
    edited[1, 0, 5, 5] += 1e-3
    with pytest.raises(ProtocolError, match="1 of 2 query images"):
        check_referee_images(edited, referee)
    calls = []
    with pytest.raises(ProtocolError):
        protocol_claim(lambda x: calls.append(x), trigger_batch(referee, ACCUSER), ACCUSER, referee)
    assert not calls


@pytest.mark.parametrize(
    "model_key, claim_key, shown",
    [(KEY, KEY, True), (KEY, ACCUSER, False), (ACCUSER.replace(payload=KEY.payload), KEY, False)],
    ids=["owner", "accuser key on the watermarked model", "owner key on a model without it"],
)
def test_claim_through_the_public_function(model_key, claim_key, shown):
    """The protocol's claim fires for the key the model carries and for no other key."""
    referee = images(3, 96)
    claim = protocol_claim(_query(TriggerOracle(model_key)), referee, claim_key, referee)
    assert claim.verdict is shown
    assert (claim.asr == 1.0) is shown


def test_without_the_protocol_queries_are_read_as_handed_in():
    """The unprotected reader does not stamp: clean queries carry nothing, the owner's triggered ones decode."""
    x = images(2, 96)
    q = _query(TriggerOracle(KEY))
    assert read_submitted_queries(q, x, KEY)["decodes"] == 0
    assert read_submitted_queries(q, trigger_batch(x, KEY), KEY)["verdict"]


@pytest.mark.parametrize(
    "successes, trials, bound",
    [(0, 1000, 1 - 0.05 ** (1 / 1000)), (0, 1, 0.95), (1, 10, 0.3942), (5, 5, 1.0)],
)
def test_false_claim_upper_bound(successes, trials, bound):
    assert false_claim_upper_bound(successes, trials) == pytest.approx(bound, abs=1e-4)


def test_upper_bound_rule_of_three_and_errors():
    assert false_claim_upper_bound(0, 1000) <= 3 / 1000
    for args in [(0, 0), (3, 2), (-1, 5)]:
        with pytest.raises(ValueError):
            false_claim_upper_bound(*args)


def test_random_accuser_keys_are_reproducible_and_distinct():
    a, b = random_accuser_keys(6, seed=3, kinds=("patch", "noise")), random_accuser_keys(6, seed=3, kinds=("patch", "noise"))
    assert [k.fingerprint for k in a] == [k.fingerprint for k in b]
    assert len({k.payload for k in a}) == 6 and len({k.trigger_seed for k in a}) == 6
    assert [k.trigger for k in a[:2]] == ["patch", "noise"] and all(k.payload.startswith("FC:") for k in a)
