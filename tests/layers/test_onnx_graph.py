from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from guardrail.layers import onnx_graph as g


def session(model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (300, b"\xac\x02"),
        (-1, b"\xff" * 9 + b"\x01"),
    ],
)
def test_varints_as_protobuf_writes_them(value: int, encoded: bytes) -> None:
    assert g._varint(value) == encoded


def test_a_graph_with_initializers_attributes_and_symbolic_dims_runs() -> None:
    weights = np.arange(6, dtype=np.float32).reshape(2, 3)
    model = g.model(
        "test",
        [
            g.node("MatMul", ["x", "w"], ["y"]),
            g.node("ArgMax", ["y"], ["best"], axis=1, keepdims=0),
            g.node("ReduceMax", ["y", "axis"], ["top"], keepdims=0),
        ],
        inputs=[g.value_info("x", g.FLOAT, ["N", 2])],
        outputs=[g.value_info("best", g.INT64, ["N"]), g.value_info("top", g.FLOAT, ["N"])],
        initializers=[g.tensor("w", weights), g.tensor("axis", np.array([1], np.int64))],
    )
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
    best, top = session(model).run(None, {"x": x})
    np.testing.assert_array_equal(best, (x @ weights).argmax(axis=1))
    np.testing.assert_allclose(top, (x @ weights).max(axis=1))


def test_negative_attributes() -> None:
    model = g.model(
        "test",
        [g.node("ArgMax", ["x"], ["best"], axis=-1, keepdims=0)],
        inputs=[g.value_info("x", g.FLOAT, ["N", 3])],
        outputs=[g.value_info("best", g.INT64, ["N"])],
    )
    assert session(model).run(None, {"x": np.array([[0, 2, 1]], np.float32)})[0].tolist() == [1]


def test_a_wrong_input_shape_is_refused_by_onnxruntime() -> None:
    model = g.model(
        "test",
        [g.node("Identity", ["x"], ["y"])],
        inputs=[g.value_info("x", g.FLOAT, ["N", 2])],
        outputs=[g.value_info("y", g.FLOAT, ["N", 2])],
    )
    with pytest.raises(Exception, match=r"(?i)dim|shape"):
        session(model).run(None, {"x": np.zeros((1, 3), np.float32)})
