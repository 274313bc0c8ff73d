"""The ignite handlers on bare ignite Engines (with MONAI's iteration events fired by hand), in a MONAI
SupervisedEvaluator and SupervisedTrainer, and across two gloo DDP ranks."""

from __future__ import annotations

import unittest

import torch
from ignite.engine import Engine, Events
from monai.inferers import SimpleInferer, SlidingWindowInferer
from parameterized import parameterized
from sklearn.metrics import roc_auc_score

from monai_stealthmark.handlers import PixelAUC, WatermarkASR

from helpers import KEY, TriggerOracle, images


class TestPixelAUCHandler(unittest.TestCase):
    def test_epoch_value_matches_sklearn(self):
        g = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(3):
            label = (torch.rand(2, 1, 16, 16, generator=g) > 0.7).float()
            logits = torch.randn(2, 2, 16, 16, generator=g) + torch.cat([-label, label], 1)
            batches.append({"pred": logits, "label": label})
        engine = Engine(lambda e, b: b)
        PixelAUC(activation="softmax").attach(engine, "val_auc")
        engine.run(batches, max_epochs=1)
        scores = torch.cat([torch.softmax(b["pred"], 1)[:, 1].reshape(-1) for b in batches])
        labels = torch.cat([b["label"].reshape(-1) for b in batches])
        self.assertAlmostEqual(engine.state.metrics["val_auc"], roc_auc_score(labels.numpy(), scores.numpy()), places=10)

    def test_decollated_output(self):
        engine = Engine(lambda e, b: [{"pred": p, "label": l} for p, l in zip(b["pred"], b["label"])])
        PixelAUC().attach(engine, "auc")
        pred = torch.tensor([[[[0.9, 0.2]]], [[[0.4, 0.1]]]])  # (2, 1, 1, 2) sigmoid-style probabilities
        label = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 0.0]]]])
        engine.run([{"pred": pred, "label": label}], max_epochs=1)
        self.assertEqual(engine.state.metrics["auc"], 1.0)
        self.assertNotIn("auc_class1", engine.state.metrics)  # one class: one entry

    def test_multi_class_mean_and_per_class(self):
        g = torch.Generator().manual_seed(1)
        label = torch.randint(0, 3, (4, 1, 12, 12), generator=g)
        logits = torch.randn(4, 3, 12, 12, generator=g) + torch.nn.functional.one_hot(label[:, 0], 3).permute(0, 3, 1, 2)
        engine = Engine(lambda e, b: b)
        PixelAUC(label_index=None, activation="softmax").attach(engine, "val_auc")
        engine.run([{"pred": logits[:2], "label": label[:2]}, {"pred": logits[2:], "label": label[2:]}], max_epochs=1)
        m, probs = engine.state.metrics, torch.softmax(logits, 1)
        expected = [roc_auc_score((label[:, 0] == c).flatten().numpy(), probs[:, c].flatten().numpy()) for c in (1, 2)]
        self.assertAlmostEqual(m["val_auc_class1"], expected[0], places=10)
        self.assertAlmostEqual(m["val_auc_class2"], expected[1], places=10)
        self.assertAlmostEqual(m["val_auc"], (expected[0] + expected[1]) / 2, places=10)


class TestWatermarkASRHandler(unittest.TestCase):
    def make_engine(self, inferer, decollate=False):
        """A bare engine with an evaluator's ``network``/``inferer``/``device``; its output is the batch dict, or
        MONAI's decollated list of per-image dicts."""
        net = TriggerOracle(KEY)

        def step(engine, batch):
            with torch.no_grad():
                pred = engine.inferer(batch["image"], engine.network)
            out = {"image": batch["image"], "pred": pred}
            return [dict(zip(out, v)) for v in zip(*out.values())] if decollate else out

        engine = Engine(step)
        engine.network, engine.inferer, engine.device = net, inferer, torch.device("cpu")
        return engine

    @parameterized.expand([("simple", SimpleInferer()), ("sliding", SlidingWindowInferer(roi_size=(96, 96), sw_batch_size=2))])
    def test_asr_in_metrics_each_epoch(self, _, inferer):
        engine = self.make_engine(inferer)
        WatermarkASR(KEY, max_images=3).attach(engine, "val_wm_asr")
        seen = []
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(dict(e.state.metrics)))
        x = images(4)
        data = [{"image": x[:2], "label": torch.zeros(2, 1, 96, 96)}, {"image": x[2:], "label": torch.zeros(2, 1, 96, 96)}]
        engine.network.train()  # the network's mode is left as it was found
        engine.run(data, max_epochs=2)
        self.assertTrue(engine.network.training)
        self.assertEqual(len(seen), 2)
        for m in seen:
            self.assertEqual(m["val_wm_asr"], 1.0)
            self.assertGreater(m["val_wm_asr_bit_acc"], 0.99)

    def test_decollated_output_and_max_images(self):
        engine = self.make_engine(SimpleInferer(), decollate=True)
        asr = WatermarkASR(KEY, max_images=3)
        asr.attach(engine, "asr")
        engine.run([{"image": images(2)}, {"image": images(2)}], max_epochs=1)
        self.assertEqual((engine.state.metrics["asr"], len(asr.metric_fn.get_buffer()[0])), (1.0, 3))

    def test_wrong_key_zero(self):
        engine = self.make_engine(SimpleInferer())
        WatermarkASR(KEY.replace(trigger_seed=99), max_images=2).attach(engine, "asr")
        engine.run([{"image": images(2), "label": torch.zeros(2, 1, 96, 96)}], max_epochs=1)
        self.assertEqual(engine.state.metrics["asr"], 0.0)

    def test_needs_evaluator(self):
        engine = Engine(lambda e, b: {"image": b})
        WatermarkASR(KEY).attach(engine, "asr")
        with self.assertRaisesRegex(RuntimeError, "network"):
            engine.run([images(1)], max_epochs=1)


class TestWithSupervisedEvaluator(unittest.TestCase):
    def test_dice_auc_asr_reported_together(self):
        from monai.engines import SupervisedEvaluator
        from monai.handlers import MeanDice, from_engine
        from monai.transforms import Activationsd, AsDiscreted, Compose

        x = images(4)
        label = (x[:, :1] > 0.7).float()
        data = [{"image": x[i], "label": label[i]} for i in range(4)]
        post = Compose([Activationsd(keys="pred", softmax=True), AsDiscreted(keys=("pred", "label"), argmax=(True, False), to_onehot=2)])
        evaluator = SupervisedEvaluator(
            device=torch.device("cpu"),
            val_data_loader=torch.utils.data.DataLoader(data, batch_size=2),
            network=TriggerOracle(KEY),
            inferer=SimpleInferer(),
            postprocessing=post,
            key_val_metric={"val_mean_dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
            additional_metrics={
                "val_auc": PixelAUC(output_transform=from_engine(["pred", "label"])),
                "val_wm_asr": WatermarkASR(KEY, max_images=4),
            },
        )
        evaluator.run()
        m = evaluator.state.metrics
        self.assertGreater(m["val_mean_dice"], 0.99)
        self.assertGreater(m["val_auc"], 0.99)
        self.assertEqual(m["val_wm_asr"], 1.0)


class TestEngineHandlers(unittest.TestCase):
    """StripWatermarkChannel and StashProbabilities on a bare ignite Engine with MONAI's iteration events fired."""

    def _engine(self, step):
        from monai.engines.utils import IterationEvents

        def _step(engine, batch):
            engine.state.output = dict(batch)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            step(engine)
            return engine.state.output

        e = Engine(_step)
        e.register_events(*IterationEvents)
        return e

    def test_strip_watermark_channel(self):
        from monai_stealthmark.handlers import StripWatermarkChannel

        seen = []
        e = self._engine(lambda eng: seen.append(eng.state.output["label"].shape[1]))
        StripWatermarkChannel(n_label_channels=1).attach(e)
        label = torch.cat([torch.ones(2, 1, 4, 4), torch.full((2, 1, 4, 4), 2.0)], 1)
        e.run([{"label": label}, {"label": torch.ones(2, 1, 4, 4)}], max_epochs=1)
        self.assertEqual(seen, [1, 1])  # the watermark channel is gone before ITERATION_COMPLETED
        e2 = self._engine(lambda eng: None)
        StripWatermarkChannel(n_label_channels=1).attach(e2)
        with self.assertRaisesRegex(ValueError, "3 channels"):
            e2.run([{"label": torch.ones(1, 3, 4, 4)}], max_epochs=1)

    def test_stash_probabilities(self):
        from monai_stealthmark.handlers import StashProbabilities

        e = self._engine(lambda eng: None)
        StashProbabilities(activation="softmax", out_key="prob").attach(e)
        logits = torch.randn(2, 3, 4, 4)
        e.run([{"pred": logits}], max_epochs=1)
        torch.testing.assert_close(e.state.output["prob"], torch.softmax(logits, 1))
        torch.testing.assert_close(e.state.output["pred"], logits)  # the prediction itself is left alone
        with self.assertRaisesRegex(ValueError, "activation"):
            StashProbabilities(activation="relu")


def _ddp_worker(local_rank: int, out_dir: str) -> None:
    """One DDP rank: half of the AUC data, and two images queried on a network that does (rank 0) or does not
    (rank 1) carry the key's watermark. Both ranks must report the metrics of the whole set."""
    import json

    import ignite.distributed as idist

    rank, world = idist.get_rank(), idist.get_world_size()
    g = torch.Generator().manual_seed(0)
    pred, label = torch.rand(4, 2, 16, 16, generator=g), (torch.rand(4, 1, 16, 16, generator=g) > 0.7).float()
    auc_engine = Engine(lambda e, b: b)
    PixelAUC(output_transform=lambda o: (o["pred"], o["label"])).attach(auc_engine, "auc")
    auc_engine.run([{"pred": pred[2 * rank : 2 * rank + 2], "label": label[2 * rank : 2 * rank + 2]}], max_epochs=1)
    asr_engine = Engine(lambda e, b: b)
    asr_engine.network = TriggerOracle(KEY if rank == 0 else KEY.replace(trigger_seed=99))
    asr_engine.inferer, asr_engine.device = SimpleInferer(), torch.device("cpu")
    WatermarkASR(KEY, max_images=8).attach(asr_engine, "asr")
    asr_engine.run([{"image": images(2)}], max_epochs=1)
    res = {"world": world, "auc": auc_engine.state.metrics["auc"], "asr": asr_engine.state.metrics["asr"]}
    res["bit_acc"] = asr_engine.state.metrics["asr_bit_acc"]
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(res, f)


class TestDistributed(unittest.TestCase):
    def test_gloo_two_processes(self):
        import json
        import tempfile

        import ignite.distributed as idist

        with tempfile.TemporaryDirectory() as tmp:
            with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
                parallel.run(_ddp_worker, tmp)
            res = [json.load(open(f"{tmp}/rank{r}.json")) for r in range(2)]
        g = torch.Generator().manual_seed(0)
        pred, label = torch.rand(4, 2, 16, 16, generator=g), (torch.rand(4, 1, 16, 16, generator=g) > 0.7).float()
        expected = roc_auc_score(label[:, 0].flatten().numpy(), pred[:, 1].flatten().numpy())
        for r in res:
            self.assertEqual(r["world"], 2)
            self.assertAlmostEqual(r["auc"], expected, places=6)  # gathered over both ranks, not one half
            self.assertEqual(r["asr"], 0.5)  # 2 of the 4 images (rank 0's) decode
            self.assertTrue(0.6 < r["bit_acc"] < 0.9)


class TestSimulatedAttacks(unittest.TestCase):
    def _trainer(self, net, lr, iters=1):
        from monai.engines import SupervisedTrainer

        x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        y = (x > 0).float()
        loader = [{"image": x, "label": y}] * iters
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        loss = torch.nn.BCEWithLogitsLoss()
        return SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=loader, network=net,
                                 optimizer=opt, loss_function=loss), x, y, loss

    def test_gradient_at_pruned_weights_step_on_restored(self):
        from monai_stealthmark.handlers import SimulatedAttacks

        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1))
        w0 = [p.detach().clone() for p in net.parameters()]
        trainer, x, y, loss_fn = self._trainer(net, lr=0.1)
        sim = SimulatedAttacks(kinds=("prune",), prob=1.0, prune_amount=(0.5, 0.5))
        sim.attach(trainer)
        trainer.run()
        self.assertEqual(sim.n_attacked, 1)
        # expected: gradient taken at the globally 50 %-pruned weights, applied to the original weights
        ref = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1))
        with torch.no_grad():
            for p, w in zip(ref.parameters(), w0):
                p.copy_(w)
            ws = [ref[0].weight, ref[2].weight]
            thr = torch.cat([w.abs().flatten() for w in ws]).kthvalue(int(0.5 * sum(w.numel() for w in ws))).values
            for w in ws:
                w.mul_((w.abs() > thr).float())
        loss_fn(ref(x), y).backward()
        for p, w, g in zip(net.parameters(), w0, (q.grad for q in ref.parameters())):
            torch.testing.assert_close(p.detach(), w - 0.1 * g)

    def test_restores_weights_and_validates(self):
        from monai_stealthmark.handlers import SimulatedAttacks

        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1))
        w0 = [p.detach().clone() for p in net.parameters()]
        trainer, *_ = self._trainer(net, lr=0.0, iters=6)
        sim = SimulatedAttacks(prob=1.0, seed=3)
        sim.attach(trainer)
        trainer.run()
        self.assertEqual(sim.n_attacked, 6)
        for p, w in zip(net.parameters(), w0):
            torch.testing.assert_close(p.detach(), w)  # lr 0: every perturbation was undone
        with self.assertRaisesRegex(ValueError, "kinds"):
            SimulatedAttacks(kinds=("dropout",))
        with self.assertRaisesRegex(ValueError, "prune_amount"):
            SimulatedAttacks(prune_amount=(0.8, 0.2))

    def test_checkpoint_resumes_the_draws(self):
        """A run resumed from a checkpoint draws the same attacks as one that was never interrupted."""
        import tempfile

        from ignite.handlers import Checkpoint

        from monai_stealthmark.handlers import SimulatedAttacks

        def fresh():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1))

        whole = SimulatedAttacks(prob=0.5, seed=7)
        trainer, *_ = self._trainer(fresh(), lr=0.0, iters=8)
        whole.attach(trainer)
        trainer.run()
        first = SimulatedAttacks(prob=0.5, seed=7)
        trainer, *_ = self._trainer(fresh(), lr=0.0, iters=3)
        first.attach(trainer)
        trainer.run()
        with tempfile.TemporaryDirectory() as d:
            path = f"{d}/sim.pt"
            torch.save({"sim": first.state_dict()}, path)
            resumed = SimulatedAttacks(prob=0.5, seed=123)  # another seed: the checkpoint decides the draws
            Checkpoint.load_objects({"sim": resumed}, torch.load(path, weights_only=True))
        trainer, *_ = self._trainer(fresh(), lr=0.0, iters=5)
        resumed.attach(trainer)
        trainer.run()
        self.assertEqual(resumed.n_attacked, whole.n_attacked)
        self.assertEqual(resumed.R.rand(), whole.R.rand())


if __name__ == "__main__":
    unittest.main()


class TestStripTriggeredCopies(unittest.TestCase):
    """After the loss the batch stage's triggered copies and the watermark channel leave the trainer's output."""

    def test_drops_triggered_rows_and_channel(self):
        from ignite.engine import Engine
        from monai.engines.utils import IterationEvents

        from monai_stealthmark.key import WM_CLEAN, WM_DARK, WM_LIGHT, WM_TWIN
        from monai_stealthmark.handlers import StripWatermarkChannel

        flags = [WM_CLEAN, WM_TWIN, WM_DARK, WM_CLEAN, WM_TWIN, WM_LIGHT]
        label = torch.zeros(6, 2, 8, 8)
        for i, f in enumerate(flags):
            label[i, 0] = i  # the row's own index, to check the order
            label[i, 1, 0, 0] = f
        engine = Engine(lambda e, b: None)
        engine.register_events(*IterationEvents)
        StripWatermarkChannel(n_label_channels=None).attach(engine)
        engine.state.output = {"image": torch.arange(6.0).view(6, 1, 1, 1), "label": label, "pred": torch.rand(6, 3, 8, 8)}
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        out = engine.state.output
        self.assertEqual(out["label"].shape, (4, 1, 8, 8))
        self.assertEqual(out["label"][:, 0, 0, 0].tolist(), [0.0, 1.0, 3.0, 4.0])  # the loaded batch, in order
        self.assertEqual(out["image"].flatten().tolist(), [0.0, 1.0, 3.0, 4.0])
        self.assertEqual(out["pred"].shape[0], 4)
