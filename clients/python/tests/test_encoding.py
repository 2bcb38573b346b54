"""Compressed updates (fedtune_worker.encoding) against docs/protocol.md's table, decoded here from the spec."""
from __future__ import annotations

import struct
import unittest

import numpy as np

from fedtune_worker import encoding
from fedtune_worker.gen import coordinator_pb2 as pb
from fedtune_worker.gen import tensors_pb2
from fedtune_worker.streams import StreamError

F32 = tensors_pb2.DTYPE_F32


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def decode_int8(data: bytes, n: int, block: int, start: np.ndarray) -> tuple:
    """The protocol's decode: ceil(n/B) float32 scales, then n int8 q; x = fround(start + fround(q * scale))."""
    nb = -(-n // block)
    scales = struct.unpack(f"<{nb}f", data[: 4 * nb])
    q = struct.unpack(f"<{n}b", data[4 * nb : 4 * nb + n])
    x = [f32(float(start[i]) + f32(q[i] * scales[i // block])) for i in range(n)]
    return scales, q, x


class FloatEncodingTest(unittest.TestCase):
    def one(self, enc: int, values) -> bytes:
        m = [("t", F32, (len(values),))]
        sent, body, kept = encoding.encode(m, {"t": np.array(values, dtype=np.float32)}, enc)
        self.assertEqual(sent, [("t", {pb.UPDATE_ENCODING_FLOAT16: tensors_pb2.DTYPE_F16, pb.UPDATE_ENCODING_BFLOAT16: tensors_pb2.DTYPE_BF16}[enc], (len(values),))])
        self.assertIsNone(kept)
        return body

    def test_float16_bits_round_to_nearest_even(self):
        cases = [(1.0, 0x3C00), (65504.0, 0x7BFF), (1 + 2**-11, 0x3C00), (1 + 3 * 2**-11, 0x3C02), (2**-24, 0x0001), (-2.0, 0xC000), (-0.0, 0x8000)]
        body = self.one(pb.UPDATE_ENCODING_FLOAT16, [v for v, _ in cases])
        self.assertEqual(list(struct.unpack(f"<{len(cases)}H", body)), [b for _, b in cases])

    def test_bfloat16_bits_round_to_nearest_even(self):
        cases = [(1.0, 0x3F80), (-2.5, 0xC020), (1 + 2**-8, 0x3F80), (1 + 3 * 2**-8, 0x3F82), (65504.0, 0x4780), (2**-133, 0x0001)]
        body = self.one(pb.UPDATE_ENCODING_BFLOAT16, [v for v, _ in cases])
        self.assertEqual(list(struct.unpack(f"<{len(cases)}H", body)), [b for _, b in cases])

    def test_a_value_beyond_the_range_is_refused_naming_the_tensor(self):
        with self.assertRaisesRegex(StreamError, r"tensor t: element 1 \(70000.0\) is beyond the range of float16; use round.update_encoding: bfloat16 or float32"):
            self.one(pb.UPDATE_ENCODING_FLOAT16, [1.0, 70000.0])
        with self.assertRaisesRegex(StreamError, r"tensor t: element 0 .* beyond the range of bfloat16; use round.update_encoding: float32"):
            self.one(pb.UPDATE_ENCODING_BFLOAT16, [3.4028235e38])


class Int8DeltaTest(unittest.TestCase):
    def test_blocks_scales_and_values_as_the_protocol_decodes_them(self):
        rng = np.random.default_rng(3)
        n, block = 70, 16  # the last block has 6 elements
        start = rng.standard_normal(n).astype(np.float32)
        update = (start + 0.01 * rng.standard_normal(n)).astype(np.float32)
        update[16:32] = start[16:32]  # a block without change: scale 0, q 0
        m = [("w", F32, (7, 10))]
        sent, body, kept = encoding.encode(m, {"w": update.reshape(7, 10)}, pb.UPDATE_ENCODING_INT8_DELTA, block, start={"w": start.reshape(7, 10)}, error_feedback=True)
        self.assertEqual(sent, [("w", tensors_pb2.DTYPE_I8, (7, 10))])
        self.assertEqual(len(body), 4 * 5 + n)
        scales, q, x = decode_int8(body, n, block, start)
        d = [f32(float(update[i]) - float(start[i])) for i in range(n)]
        for b in range(5):
            self.assertEqual(scales[b], f32(max(abs(v) for v in d[b * block : (b + 1) * block]) / 127))
        self.assertEqual(scales[1], 0.0)
        self.assertEqual(q[16:32], (0,) * 16)
        self.assertTrue(all(-127 <= v <= 127 for v in q))
        for i in range(n):
            # round half to even of d / scale, so each value within half a step of the update
            self.assertLessEqual(abs(x[i] - float(update[i])), scales[i // block] / 2 * (1 + 1e-6) + 1e-7, i)
        # Error feedback: what the coordinator's copy lacks, r = fround(d - (x - start)).
        r = kept["w"].reshape(-1)
        self.assertEqual(kept["w"].shape, (7, 10))
        for i in range(n):
            self.assertEqual(float(r[i]), f32(d[i] - (x[i] - float(start[i]))))
        # The next round adds it to the delta: d2 = fround(update2 - start2 + r).
        start2 = np.asarray(x, dtype=np.float32)
        update2 = (start2 + 0.01).astype(np.float32)
        _, body2, _ = encoding.encode(m, {"w": update2.reshape(7, 10)}, pb.UPDATE_ENCODING_INT8_DELTA, block, start={"w": start2.reshape(7, 10)}, residual=kept, error_feedback=True)
        scales2, _, _ = decode_int8(body2, n, block, start2)
        d2 = [f32(float(update2[i]) - float(start2[i]) + float(r[i])) for i in range(n)]
        self.assertEqual(scales2[0], f32(max(abs(v) for v in d2[:block]) / 127))
        # A residual of another shape (another rank) counts as zero.
        _, body3, _ = encoding.encode(m, {"w": update2.reshape(7, 10)}, pb.UPDATE_ENCODING_INT8_DELTA, block, start={"w": start2.reshape(7, 10)}, residual={"w": np.ones(3, np.float32)})
        _, body4, _ = encoding.encode(m, {"w": update2.reshape(7, 10)}, pb.UPDATE_ENCODING_INT8_DELTA, block, start={"w": start2.reshape(7, 10)})
        self.assertEqual(body3, body4)

    def test_without_a_start_it_is_refused(self):
        with self.assertRaisesRegex(StreamError, "int8_delta: tensor w has no start value of 4 elements"):
            encoding.encode([("w", F32, (4,))], {"w": np.zeros(4, np.float32)}, pb.UPDATE_ENCODING_INT8_DELTA, 2, start={})


class ChoiceTest(unittest.TestCase):
    def test_the_asked_encoding_when_accepted_else_float32(self):
        spec = pb.UpdateEncodingSpec
        plain = (pb.UPDATE_ENCODING_FLOAT32, 0, False)
        self.assertEqual(encoding.choose(None), plain)
        self.assertEqual(encoding.choose(spec(encoding=pb.UPDATE_ENCODING_FLOAT16, accepted=[pb.UPDATE_ENCODING_FLOAT32, pb.UPDATE_ENCODING_FLOAT16])), (pb.UPDATE_ENCODING_FLOAT16, 0, False))
        self.assertEqual(encoding.choose(spec(encoding=pb.UPDATE_ENCODING_FLOAT16, accepted=[pb.UPDATE_ENCODING_FLOAT32])), plain)
        int8 = [pb.UPDATE_ENCODING_FLOAT32, pb.UPDATE_ENCODING_INT8_DELTA]
        self.assertEqual(encoding.choose(spec(encoding=pb.UPDATE_ENCODING_INT8_DELTA, block_size=64, error_feedback=True, accepted=int8)), (pb.UPDATE_ENCODING_INT8_DELTA, 64, True))
        self.assertEqual(encoding.choose(spec(encoding=pb.UPDATE_ENCODING_INT8_DELTA, block_size=0, accepted=int8)), plain)
        self.assertEqual(encoding.choose(spec(encoding=99, accepted=[99])), plain)  # an encoding this client does not know


if __name__ == "__main__":
    unittest.main()
