"""Deployment formats: a suspect exported to ONNX and run by onnxruntime in fp32, fp16 and real int8 (static, QDQ),
as attacks and as the verifier's query (``OnnxModelQuery``, ``load_suspect_query``)."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path
from unittest import mock

import onnx
import onnxruntime as ort
import torch
from helpers import KEY, ExportableTriggerOracle, images
from monai.networks.nets import UNet
from onnx import TensorProto, helper
from parameterized import parameterized

from monai_stealthmark import attacks as A
from monai_stealthmark.attacks._common import train_steps
from monai_stealthmark.verify import ModelQuery, NotProbabilitiesError, check_probabilities, OnnxModelQuery, load_suspect_query, verify_ownership

SIZE = 64


def blobs(n: int, seed: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic segmentation data: a bright disc (the organ) of random centre and radius on a noisy background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    x, y = torch.rand(n, 1, size, size, generator=g) * 0.5, torch.zeros(n, 1, size, size)
    for i in range(n):
        cy, cx = torch.randint(size // 3, 2 * size // 3, (2,), generator=g).tolist()
        r = int(torch.randint(size // 10, size // 6, (1,), generator=g))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        y[i, 0][disc] = 1
        x[i, 0][disc] += 0.4
    return x, y


def graph(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    """A small hand-made ONNX model (opset 18)."""
    g = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def image_input(shape=("batch", 1, 8, 8), dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info("image", dtype, list(shape))


def output(shape=("batch", 2, 8, 8)):
    return helper.make_tensor_value_info("out", TensorProto.FLOAT, list(shape))


class TestOnnxUNet(unittest.TestCase):
    """A MONAI UNet trained a few steps: onnxruntime's outputs against torch's, and what the int8 model runs."""

    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        x, y = blobs(32, seed=0)
        net = UNet(2, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=2)
        cls.net = train_steps(net, x, y, steps=40, lr=3e-3, seed=0)
        cls.calib, cls.x = x[:16], blobs(6, seed=1)[0]
        cls.tmp = tempfile.TemporaryDirectory()
        cls.path = Path(cls.tmp.name) / "unet.onnx"
        fp32 = A.export_onnx(cls.net, cls.x[:1], path=cls.path)
        cls.protos = {"fp32": fp32, "fp16": A.onnx_fp16(fp32), "int8": A.onnx_int8_static(fp32, cls.calib)}
        cls.p_torch = ModelQuery(cls.net, activation="softmax", device="cpu")(cls.x)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_export_is_a_checked_file_with_a_dynamic_batch(self):
        proto = onnx.load(str(self.path))
        onnx.checker.check_model(proto, full_check=True)
        q = OnnxModelQuery(self.path)
        self.assertEqual(q.window, (SIZE, SIZE))  # the fixed spatial shape is the model's window
        self.assertIsNone(q.runtime.input_shape[0])
        self.assertEqual(tuple(q(self.x[:5]).shape), (5, 2, SIZE, SIZE))
        self.assertEqual(q.n_queries, 5)

    @parameterized.expand([("fp32", 1e-4, 1e-6, 1.0), ("fp16", 2e-2, 1e-3, 0.999), ("int8", 0.5, 0.05, 0.95)])
    def test_probabilities_close_to_torch(self, precision, max_diff, mean_diff, agreement):
        p = OnnxModelQuery(self.protos[precision], batch_size=4)(self.x)
        diff = (p - self.p_torch).abs()
        self.assertLessEqual(float(diff.max()), max_diff)
        self.assertLessEqual(float(diff.mean()), mean_diff)
        self.assertGreaterEqual(float((p.argmax(1) == self.p_torch.argmax(1)).float().mean()), agreement)

    def test_int8_is_quantised_and_runs_integer_kernels(self):
        """Weights stored as int8, and onnxruntime fuses the QDQ graph into integer kernels (not a simulation)."""
        proto = self.protos["int8"]
        ops = {n.op_type for n in proto.graph.node}
        self.assertTrue({"QuantizeLinear", "DequantizeLinear"} <= ops)
        self.assertIn(TensorProto.INT8, {t.data_type for t in proto.graph.initializer})
        opt = Path(self.tmp.name) / "int8_optimised.onnx"
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(opt)
        options.log_severity_level = 3
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        fused = [n.op_type for n in onnx.load(str(opt)).graph.node]
        self.assertIn("QLinearConv", fused)
        self.assertNotIn("QLinearConv", [n.op_type for n in self.protos["fp32"].graph.node])

    def test_fp16_stores_half_weights(self):
        types = {t.data_type for t in self.protos["fp16"].graph.initializer}
        self.assertIn(TensorProto.FLOAT16, types)
        self.assertNotIn(TensorProto.FLOAT, types)

    def test_suite_rows_deploy_the_model(self):
        from experiments.robustness import attack_suite, onnx_attacks

        suite = attack_suite(self.net, self.calib, torch.zeros_like(self.calib), epochs=1)
        labels = list(suite)
        rows = ["onnxruntime_fp32", "onnxruntime_fp16", "onnxruntime_int8_static"]
        at = labels.index("torchscript_roundtrip") + 1
        self.assertEqual(labels[at : at + 3], rows)
        name, params, build = onnx_attacks(self.net, self.calib)["onnxruntime_int8_static"]
        self.assertEqual(params["calibration"], "attacker slices")
        # the export itself is tested above; here the row's own quantisation and query run on that export
        with mock.patch("monai_stealthmark.attacks.onnx.export_onnx", return_value=self.protos["fp32"]) as export:
            q = build()
        self.assertIs(export.call_args.args[0], self.net)
        self.assertTrue(torch.equal(export.call_args.args[1], self.calib[:1]))
        self.assertIsInstance(q, OnnxModelQuery)
        self.assertIn("QuantizeLinear", {n.op_type for n in q.runtime.proto.graph.node})
        self.assertLess(float((q(self.x) - self.p_torch).abs().mean()), 0.05)

    def test_clean_model_makes_no_claim_through_onnx(self):
        rep = verify_ownership(OnnxModelQuery(self.protos["int8"]), self.x[:3], KEY)
        self.assertFalse(rep.verdict)
        self.assertIsNone(rep.vote_decoded)


class TestOnnxVerification(unittest.TestCase):
    """A watermarked double in tensor operations: the report read through onnxruntime is the torch model's."""

    @classmethod
    def setUpClass(cls):
        cls.x = images(3, size=96)
        cls.oracle = ExportableTriggerOracle(KEY, size=96).eval()
        cls.ref = verify_ownership(ModelQuery(cls.oracle, device="cpu"), cls.x, KEY)
        fp32 = A.export_onnx(cls.oracle, cls.x[:1])
        cls.protos = {"fp32": fp32, "fp16": A.onnx_fp16(fp32), "int8": A.onnx_int8_static(fp32, cls.x)}
        cls.tmp = tempfile.TemporaryDirectory()

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    @parameterized.expand([("fp32", 0.0), ("fp16", 0.02), ("int8", 0.02)])
    def test_report_equals_torch(self, precision, bit_tolerance):
        self.assertTrue(self.ref.verdict)
        rep = verify_ownership(OnnxModelQuery(self.protos[precision]), self.x, KEY)
        self.assertEqual(rep.asr, self.ref.asr)
        self.assertEqual(rep.verdict, self.ref.verdict)
        self.assertEqual(rep.vote_decoded, KEY.payload)
        self.assertEqual(rep.decoded, self.ref.decoded)
        self.assertAlmostEqual(rep.mean_bit_accuracy, self.ref.mean_bit_accuracy, delta=bit_tolerance + 1e-12)
        self.assertLessEqual(rep.p_value, 1e-6)

    def test_wrong_key_makes_no_claim(self):
        rep = verify_ownership(OnnxModelQuery(self.protos["int8"]), self.x, KEY.replace(trigger_seed=3))
        self.assertFalse(rep.verdict)
        self.assertEqual(rep.asr, 0.0)

    def test_load_suspect_query_by_suffix(self):
        tmp = Path(self.tmp.name)
        A.save_onnx(self.protos["int8"], tmp / "suspect.onnx")
        q = load_suspect_query(tmp / "suspect.onnx", "softmax")
        self.assertIsInstance(q, OnnxModelQuery)
        self.assertEqual(verify_ownership(q, self.x, KEY).decoded, self.ref.decoded)
        torch.jit.trace(self.oracle, self.x[:1]).save(str(tmp / "suspect.ts"))
        ts = load_suspect_query(tmp / "suspect.ts", "softmax", device="cpu")
        self.assertNotIsInstance(ts, OnnxModelQuery)
        self.assertEqual(verify_ownership(ts, self.x, KEY).decoded, self.ref.decoded)
        with self.assertRaisesRegex(ValueError, "ONNX file .* or TorchScript"):
            load_suspect_query(tmp / "suspect.h5", "softmax")


class TestOnnxErrors(unittest.TestCase):
    """Clear errors for files that are not models, models that are not segmentation networks, and bad settings."""

    def test_missing_and_non_model_files(self):
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaises(FileNotFoundError):
                OnnxModelQuery(Path(d) / "none.onnx")
            for name, data in (("text.onnx", b"this is not a model\n"), ("empty.onnx", b"")):
                (Path(d) / name).write_bytes(data)
                with self.assertRaisesRegex(ValueError, "is not an ONNX model"):
                    load_suspect_query(Path(d) / name, "softmax")

    def test_hard_mask_model_is_refused(self):
        """A model that returns one-hot masks hides the watermark: the query refuses it, as ModelQuery does."""
        half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
        one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
        nodes = [
            helper.make_node("Greater", ["image", "half"], ["fg"]),
            helper.make_node("Cast", ["fg"], ["mask"], to=TensorProto.FLOAT),
            helper.make_node("Sub", ["one", "mask"], ["bg"]),
            helper.make_node("Concat", ["bg", "mask"], ["out"], axis=1),
        ]
        q = OnnxModelQuery(graph(nodes, [image_input()], [output()], [half, one]))
        with self.assertRaisesRegex(NotProbabilitiesError, "hard masks"):
            q(torch.rand(2, 1, 8, 8))
        raw = OnnxModelQuery(graph(nodes, [image_input()], [output()], [half, one]), activation=None)
        x = torch.rand(2, 1, 8, 8)
        with self.assertRaisesRegex(NotProbabilitiesError, "hard masks"):
            check_probabilities(raw(x), x)

    def test_inputs_that_are_not_one_image(self):
        two = graph([helper.make_node("Add", ["image", "other"], ["out"])], [image_input(), helper.make_tensor_value_info("other", TensorProto.FLOAT, ["batch", 1, 8, 8])], [output(("batch", 1, 8, 8))])
        with self.assertRaisesRegex(ValueError, "one image input"):
            OnnxModelQuery(two)
        ints = graph([helper.make_node("Cast", ["image"], ["out"], to=TensorProto.FLOAT)], [image_input(dtype=TensorProto.INT64)], [output(("batch", 1, 8, 8))])
        with self.assertRaisesRegex(ValueError, "not a floating-point image"):
            OnnxModelQuery(ints)

    def test_fixed_shapes(self):
        """A fixed batch of one runs image by image; a query at another spatial size is refused with the reason."""
        nodes = [helper.make_node("Concat", ["image", "image"], ["out"], axis=1)]
        q = OnnxModelQuery(graph(nodes, [image_input((1, 1, 8, 8))], [output((1, 2, 8, 8))]), activation="softmax")
        x = torch.rand(3, 1, 8, 8)
        self.assertTrue(torch.allclose(q(x), torch.full((3, 2, 8, 8), 0.5)))
        with self.assertRaisesRegex(ValueError, r"takes inputs of shape \(1, 1, 8, 8\)"):
            q(torch.rand(1, 1, 16, 16))

    def test_deployment_settings(self):
        net = torch.nn.Conv2d(1, 2, 1)
        with self.assertRaisesRegex(ValueError, "precision must be one of"):
            A.onnx_deployment(net, torch.rand(1, 1, 8, 8), "int4")
        with self.assertRaisesRegex(ValueError, "needs calibration_images"):
            A.onnx_deployment(net, torch.rand(1, 1, 8, 8), "int8")
        with self.assertRaisesRegex(ValueError, "activation_type must be one of"):
            A.onnx_int8_static(onnx.ModelProto(), torch.rand(2, 1, 8, 8), activation_type="int4")
        with self.assertRaisesRegex(TypeError, "torch.nn.Module"):
            A.export_onnx(lambda x: x, torch.rand(1, 1, 8, 8))

    def test_calibration_reader(self):
        from onnxruntime.quantization import CalibrationDataReader

        reader = A.ImageCalibrationReader(torch.rand(5, 1, 8, 8), batch_size=2)
        self.assertIsInstance(reader, CalibrationDataReader)
        shapes = [b["image"].shape for b in iter(reader.get_next, None)]
        self.assertEqual(shapes, [(2, 1, 8, 8), (2, 1, 8, 8), (1, 1, 8, 8)])
        reader.rewind()
        self.assertEqual(len(list(iter(reader.get_next, None))), len(reader))
        with self.assertRaisesRegex(ValueError, "non-empty"):
            A.ImageCalibrationReader(torch.rand(0, 1, 8, 8))


if __name__ == "__main__":
    unittest.main()
