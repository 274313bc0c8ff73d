"""Each attack's code path on a tiny model (seconds), and the runner's removal rule."""

from __future__ import annotations

import unittest

import torch
from helpers import TriggerOracle, images
from monai.networks.nets import BasicUNet, UNet
from parameterized import parameterized

from monai_stealthmark.attacks import (
    INPUT_ATTACKS,
    CastQuery,
    GridQuery,
    InputTransformQuery,
    SpacingQuery,
    channel_prune,
    distill,
    finetune,
    global_magnitude_prune,
    int8_static,
    int8_weights,
    is_removed,
    overwrite,
    reinit_head,
    run_attack,
    sparsity,
    torchscript_roundtrip,
    weight_noise,
)
from monai_stealthmark.attacks._common import conv_layers
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.verify import ModelQuery, verify_ownership

KEY = WatermarkKey.generate("SM:attack", seed=31)


def tiny(seed=0):
    torch.manual_seed(seed)
    return UNet(2, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1).eval()


def data(n=6, size=64):
    x = images(n, size=size)
    y = (x[:, :1] > 0.7).float()
    return x, y


def params(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


class TestAttacks(unittest.TestCase):
    def test_finetune_all_last_and_reinit(self):
        m = tiny()
        x, y = data()
        base = params(m)
        all_ = finetune(m, x, y, epochs=2, lr=1e-3)
        self.assertFalse(torch.equal(params(all_), base))
        torch.testing.assert_close(params(m), base)  # the owner's model is untouched
        last = finetune(m, x, y, epochs=2, lr=1e-3, layers="last")
        head_name = conv_layers(last)[-1][0]
        for (n, p), (_, q) in zip(last.named_parameters(), m.named_parameters()):
            changed = not torch.equal(p, q)
            self.assertEqual(changed, n.startswith(head_name), n)
        r = reinit_head(m, seed=1)
        self.assertFalse(torch.equal(conv_layers(r)[-1][1].weight, conv_layers(m)[-1][1].weight))
        with self.assertRaisesRegex(ValueError, "layers"):
            finetune(m, x, y, layers="middle")

    def test_pruning(self):
        m = tiny()
        for amount in (0.1, 0.5, 0.9):
            self.assertAlmostEqual(sparsity(global_magnitude_prune(m, amount)), amount, delta=0.01)
        self.assertLess(sparsity(m), 0.01)
        cp = channel_prune(m, images(4, size=64), amount=0.5, n_layers=2)
        self.assertGreater(sparsity(cp), sparsity(m))
        with self.assertRaisesRegex(ValueError, "amount"):
            global_magnitude_prune(m, 1.0)

    def test_quantisation_and_export(self):
        m = tiny()
        x = images(2, size=64)
        with torch.no_grad():
            ref = m(x)
            for q in (int8_weights(m), int8_static(m, x), CastQuery(m, torch.bfloat16), CastQuery(m, torch.float16)):
                out = q(x)
                self.assertEqual(out.dtype, torch.float32)
                self.assertLess((out - ref).abs().max().item(), 0.25 * ref.abs().max().item())
                self.assertFalse(torch.equal(out, ref))
            w = conv_layers(int8_weights(m))[0][1].weight
            self.assertLessEqual(len(torch.unique(w[0])), 255)
            torch.testing.assert_close(torchscript_roundtrip(m, x)(x), ref)

    def test_weight_noise(self):
        m = tiny()
        n = weight_noise(m, 0.1, seed=0)
        w0, w1 = conv_layers(m)[1][1].weight, conv_layers(n)[1][1].weight
        ratio = ((w1 - w0).std() / w0.std()).item()
        self.assertAlmostEqual(ratio, 0.1, delta=0.03)
        torch.testing.assert_close(weight_noise(m, 0.1, seed=0).state_dict()["model.0.conv.unit0.conv.weight"], n.state_dict()["model.0.conv.unit0.conv.weight"])

    def test_distillation_soft_and_hard_with_budget(self):
        teacher = ModelQuery(TriggerOracle(KEY), device="cpu")
        x = images(6, size=64)
        calls = []

        def counting(q):
            calls.append(q.shape[0])
            return teacher(q)

        for outputs, arch in (("soft", "unet"), ("hard", "basic")):
            torch.manual_seed(0)
            student = tiny() if arch == "unet" else BasicUNet(2, 1, 2, features=(8, 8, 16, 16, 32, 8))
            calls.clear()
            s = distill(counting, student, x, steps=40, lr=3e-3, outputs=outputs, query_budget=10)
            self.assertEqual(sum(calls), 10)
            with torch.no_grad():
                agree = (s(x).argmax(1) == teacher(x).argmax(1)).float().mean().item()
            self.assertGreater(agree, 0.8, outputs)

    def test_input_transforms(self):
        q = ModelQuery(TriggerOracle(KEY), device="cpu")
        x = images(2, size=96)
        for name, make in INPUT_ATTACKS.items():
            t = make()
            out = InputTransformQuery(q, t)(x)
            self.assertEqual(out.shape, (2, 2, 96, 96), name)
            if t != "flip_tta":
                self.assertEqual(t(x).shape, x.shape, name)
        noisy = INPUT_ATTACKS["gaussian_noise_0.05"]()(x)
        rng = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).mean()
        self.assertAlmostEqual(((noisy - x).std() / rng).item(), 0.05, delta=0.01)
        # the verifier goes through the wrapper: the transformed images are what the model sees
        seen = []
        InputTransformQuery(lambda z: seen.append(z) or q(z), INPUT_ATTACKS["resample_0.5"]())(x)
        self.assertFalse(torch.equal(seen[0], x))

    def test_grid_query(self):
        # the pipeline resamples each query to the network's grid and the answer back to the query's grid
        seen = []

        def suspect(z):
            seen.append(z.shape)
            return torch.softmax(torch.stack([z[:, 0], -z[:, 0]], 1), 1)

        x = images(2, size=96)
        out = GridQuery(suspect, (48, 48))(x)
        self.assertEqual(seen, [torch.Size([2, 1, 48, 48])])
        self.assertEqual(out.shape, (2, 2, 96, 96))
        torch.testing.assert_close(out.sum(1), torch.ones(2, 96, 96))
        torch.testing.assert_close(GridQuery(suspect, (96, 96))(x), suspect(x))

    @parameterized.expand([("coarser_padded", 3.0, (48, 48), [(2, 1, 48, 48)]), ("finer_tiled", 1.5, (48, 48), None)])
    def test_spacing_query(self, _, pixdim, roi, windows):
        # Spacing 2 mm -> pixdim, sliding windows of the network's size, the answer inverted to the query grid
        seen = []

        def suspect(z):
            seen.append(tuple(z.shape))
            return torch.softmax(torch.stack([z[:, 0], -z[:, 0]], 1), 1)

        x = images(2, size=64)
        out = SpacingQuery(suspect, 2.0, pixdim, roi)(x)
        self.assertEqual(out.shape, (2, 2, 64, 64))
        one_by_one = torch.cat([SpacingQuery(suspect, 2.0, pixdim, roi)(x[i : i + 1]) for i in range(2)])
        torch.testing.assert_close(out, one_by_one)  # the batch is resampled image by image
        seen.clear()
        out = SpacingQuery(suspect, 2.0, pixdim, roi)(x)
        torch.testing.assert_close(out.sum(1), torch.ones(2, 64, 64))
        self.assertTrue(all(s[2:] == roi for s in seen))
        if windows is not None:  # 64 px at 2 mm -> 43 px at 3 mm: one padded window per image, both in one call
            self.assertEqual(seen, windows)
        else:  # 64 px at 2 mm -> 85 px at 1.5 mm: several windows per image
            self.assertGreater(sum(s[0] for s in seen), 2)
        # at the query's own spacing and size the pipeline is the bare model
        torch.testing.assert_close(SpacingQuery(suspect, 2.0, 2.0, (64, 64))(x), suspect(x), atol=1e-5, rtol=0)

    def test_overwrite_runs_and_changes_the_model(self):
        m = tiny()
        x, y = data(4)
        attacker = WatermarkKey.generate("ATTACKER", seed=77)
        o = overwrite(m, x, y, attacker, steps=3, batch_size=2)
        self.assertFalse(torch.equal(params(o), params(m)))


class TestRunner(unittest.TestCase):
    def test_removal_rule(self):
        self.assertTrue(is_removed(False, 0.80, 0.82))
        self.assertFalse(is_removed(False, 0.70, 0.82))  # a destroyed model is not a removal
        self.assertFalse(is_removed(True, 0.82, 0.82))

    def test_run_attack_row(self):
        x = images(3)
        oracle = TriggerOracle(KEY)
        verify = lambda m: verify_ownership(ModelQuery(m, device="cpu"), x, KEY)
        keep = run_attack("identity", {}, lambda: oracle, lambda m: 0.8, verify, reference_dice=0.8)
        self.assertTrue(keep.verdict and not keep.removed and keep.asr == 1.0)
        gone = run_attack("swap", {"k": 1}, lambda: TriggerOracle(KEY.replace(trigger_seed=5)), lambda m: 0.79, verify, 0.8)
        self.assertTrue(gone.removed and gone.asr == 0.0)
        broken = run_attack("broken", {}, lambda: TriggerOracle(KEY.replace(trigger_seed=5)), lambda m: 0.1, verify, 0.8)
        self.assertFalse(broken.removed)
        self.assertEqual(set(gone.to_dict()) >= {"attack", "params", "clean_dice", "asr", "p_value", "removed", "seconds"}, True)


if __name__ == "__main__":
    unittest.main()
