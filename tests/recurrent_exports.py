"""Small recurrent exports of each kind, built by the tests, and the same network in numpy.

The network is a one-layer recurrent cell with two state tensors (as an LSTM's h and c)
reading the observation, the previous action and the previous reward:

    h' = tanh(obs Wx + prev Wa + r wr + h Wh + b),   c' = c / 2 + h'
    logits = h' Wl + c' Wc + bl,                       value = h' wv

Exports: a TF1 graph with RLlib's signature (`_build_signature_def`: state inputs
`default_policy/state_in_N:0`, or unnamed placeholders; `seq_lens`, `prev_action`,
`prev_reward`, `is_training`, `timestep`; state outputs named by tensor), discrete or
continuous; the same as `model.onnx` with graph tensor names (roles in schema.yaml); and a
TF2 Keras export (`fc_out`, `value_out`), which is not recurrent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tests.exports import zip_folder

OBS = 3
CELL = 4
STATE_OUTPUTS = (
    "default_policy/model_1/lstm/while/Exit_3",
    "default_policy/model_1/lstm/while/Exit_4",
)
SCHEMA = """\
observations:
  x:
    type: float
  y:
    type: float
  z:
    type: float
parameters:
  discrete: {discrete}
  tuple: False
  api_key: k
{extra}"""

Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Cell:
    """The network's weights; `step` runs it by hand."""

    wx: Array
    wa: Array
    wr: Array
    wh: Array
    b: Array
    wl: Array
    wc: Array
    bl: Array
    wv: Array
    discrete: bool
    actions: int  # Discrete: n; Box: its dimensions

    @property
    def logits_width(self) -> int:
        return self.actions if self.discrete else 2 * self.actions

    def prev_features(self, prev: npt.NDArray[np.float64]) -> Array:
        if self.discrete:
            return np.eye(self.actions, dtype=np.float32)[prev.astype(np.int64).reshape(-1)]
        return prev.astype(np.float32).reshape(len(prev), self.actions)

    def step(
        self,
        obs: Array,
        h: Array,
        c: Array,
        prev: npt.NDArray[np.float64],
        reward: Array,
    ) -> tuple[Array, Array, Array, Array]:
        """logits, value, h', c' for a batch."""
        pre = obs @ self.wx + self.prev_features(prev) @ self.wa + reward[:, None] * self.wr
        h1 = np.tanh(pre + h @ self.wh + self.b)
        c1 = c / 2 + h1
        logits = h1 @ self.wl + c1 @ self.wc + self.bl
        return logits, h1 @ self.wv, h1, c1


def cell(discrete: bool = True, actions: int = 3, seed: int = 7) -> Cell:
    rng = np.random.default_rng(seed)
    width = actions if discrete else 2 * actions

    def w(*shape: int) -> Array:
        return rng.normal(scale=0.7, size=shape).astype(np.float32)

    return Cell(
        w(OBS, CELL), w(actions, CELL), w(CELL), w(CELL, CELL), w(CELL),
        w(CELL, width), w(CELL, width), w(width), w(CELL), discrete, actions,
    )  # fmt: skip


def tf1_recurrent_policy(folder: Path, net: Cell, unnamed: bool = False, prev: bool = True) -> None:
    """A TF1 SavedModel with RLlib's signature layout; `unnamed`: the state inputs are
    placeholders without a name (`Placeholder`, `Placeholder_1`), as in nativerl#266."""
    import tensorflow as tf

    v1 = tf.compat.v1
    model = folder / "export"
    graph = tf.Graph()
    with graph.as_default(), v1.variable_scope("default_policy"):
        obs = v1.placeholder(tf.float32, [None, OBS], name="obs")
        names = ("Placeholder", "Placeholder_1") if unnamed else ("state_in_0", "state_in_1")
        h = v1.placeholder(tf.float32, [None, CELL], name=names[0])
        c = v1.placeholder(tf.float32, [None, CELL], name=names[1])
        seq_lens = v1.placeholder(tf.int32, [None], name="seq_lens")
        if net.discrete:
            prev_actions = v1.placeholder(tf.int64, [None], name="prev_actions")
            features = tf.one_hot(prev_actions, net.actions)
        else:
            prev_actions = v1.placeholder(tf.float32, [None, net.actions], name="prev_actions")
            features = prev_actions
        prev_rewards = v1.placeholder(tf.float32, [None], name="prev_rewards")
        is_training = v1.placeholder_with_default(False, [], name="is_training")
        timestep = v1.placeholder(tf.int64, [], name="timestep")

        def var(name: str, value: Array) -> object:
            return v1.get_variable(name, initializer=value, use_resource=False)

        pre = tf.matmul(obs, var("wx", net.wx))
        if prev:
            pre += tf.matmul(features, var("wa", net.wa))
            pre += prev_rewards[:, None] * var("wr", net.wr)
        # RLlib's LSTM reads seq_lens; each sequence here is one step long.
        pre *= tf.cast(tf.reduce_max(seq_lens), tf.float32)
        h1 = tf.tanh(pre + tf.matmul(h, var("wh", net.wh)) + var("b", net.b))
        c1 = c / 2 + h1
        logits = tf.add(
            tf.matmul(h1, var("wl", net.wl)) + tf.matmul(c1, var("wc", net.wc)),
            var("bl", net.bl),
            name="Reshape_3",
        )
        value = tf.reduce_sum(h1 * var("wv", net.wv), axis=1, name="Reshape_4")
        h_out = tf.identity(h1, name="model_1/lstm/while/Exit_3")
        c_out = tf.identity(c1, name="model_1/lstm/while/Exit_4")
        explore = tf.cast(timestep, tf.float32) < 0  # sampling reads timestep, as RLlib's
        if net.discrete:
            actions = tf.where(
                tf.logical_and(explore, tf.logical_not(is_training)),
                tf.random.categorical(logits, 1)[:, 0],
                tf.argmax(logits, axis=1),
            )
        else:
            actions = logits[:, : net.actions]
        inputs = {
            "observations": obs,
            h.name: h,
            c.name: c,
            "seq_lens": seq_lens,
            "is_training": is_training,
            "timestep": timestep,
        }
        if prev:
            inputs |= {"prev_action": prev_actions, "prev_reward": prev_rewards}
        signature = v1.saved_model.signature_def_utils.predict_signature_def(
            inputs=inputs,
            outputs={
                "actions_0": actions,
                "action_dist_inputs": logits,
                "vf_preds": value,
                "action_prob": tf.ones_like(value),
                "action_logp": tf.zeros_like(value),
                h_out.name: h_out,
                c_out.name: c_out,
            },
        )
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            builder = v1.saved_model.Builder(str(model))
            builder.add_meta_graph_and_variables(
                session, ["serve"], signature_def_map={"serving_default": signature}
            )
            builder.save()
    zip_folder(model, folder / "saved_model.zip")
    (folder / "schema.yaml").write_text(SCHEMA.format(discrete=net.discrete, extra=""))


ONNX_ROLES = """\
  action_space: {type: Discrete, n: %d}
  model:
    observations: "default_policy/obs:0"
    logits: "default_policy/Reshape_3:0"
    value: "default_policy/Reshape_4:0"
    state_in: ["default_policy/state_in_0:0", "default_policy/state_in_1:0"]
    state_out:
      - "default_policy/model_1/lstm/while/Exit_3:0"
      - "default_policy/model_1/lstm/while/Exit_4:0"
    seq_lens: "default_policy/seq_lens:0"
    prev_actions: "default_policy/prev_actions:0"
    prev_rewards: "default_policy/prev_rewards:0"
"""


def onnx_recurrent_policy(
    folder: Path, net: Cell, roles: bool = True, extra_input: bool = False
) -> None:
    """The same network as the `model.onnx` RLlib's `export_model(onnx=...)` writes: inputs
    and outputs named by graph tensor, so schema.yaml names their roles (`roles`).
    `extra_input` adds an input of no known role."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    assert net.discrete
    p = "default_policy/"
    h_out, c_out = p + "model_1/lstm/while/Exit_3:0", p + "model_1/lstm/while/Exit_4:0"
    consts: dict[str, npt.NDArray[Any]] = {
        "wx": net.wx, "wa": net.wa, "wr": net.wr[None, :], "wh": net.wh, "b": net.b,
        "wl": net.wl, "wc": net.wc, "bl": net.bl, "wv": net.wv[:, None],
        "eye": np.eye(net.actions, dtype=np.float32), "half": np.array(0.5, np.float32),
        "col": np.array([-1, 1], np.int64), "flat": np.array([-1], np.int64),
    }  # fmt: skip
    nodes = [
        helper.make_node("MatMul", [p + "obs:0", "wx"], ["a"]),
        helper.make_node("Gather", ["eye", p + "prev_actions:0"], ["onehot"], axis=0),
        helper.make_node("MatMul", ["onehot", "wa"], ["b1"]),
        helper.make_node("Reshape", [p + "prev_rewards:0", "col"], ["r"]),
        helper.make_node("MatMul", ["r", "wr"], ["b2"]),
        helper.make_node("MatMul", [p + "state_in_0:0", "wh"], ["b3"]),
        helper.make_node("Sum", ["a", "b1", "b2", "b3", "b"], ["pre"]),
        helper.make_node("Tanh", ["pre"], [h_out]),
        helper.make_node("Mul", [p + "state_in_1:0", "half"], ["c_half"]),
        helper.make_node("Add", ["c_half", h_out], [c_out]),
        helper.make_node("MatMul", [h_out, "wl"], ["l1"]),
        helper.make_node("MatMul", [c_out, "wc"], ["l2"]),
        helper.make_node("Sum", ["l1", "l2", "bl"], [p + "Reshape_3:0"]),
        helper.make_node("MatMul", [h_out, "wv"], ["v"]),
        helper.make_node("Reshape", ["v", "flat"], [p + "Reshape_4:0"]),
    ]  # fmt: skip
    f, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    inputs = [
        helper.make_tensor_value_info(p + "obs:0", f, ["batch", OBS]),
        helper.make_tensor_value_info(p + "state_in_0:0", f, ["batch", CELL]),
        helper.make_tensor_value_info(p + "state_in_1:0", f, ["batch", CELL]),
        helper.make_tensor_value_info(p + "seq_lens:0", i32, ["batch"]),
        helper.make_tensor_value_info(p + "prev_actions:0", i64, ["batch"]),
        helper.make_tensor_value_info(p + "prev_rewards:0", f, ["batch"]),
        helper.make_tensor_value_info(p + "is_training:0", TensorProto.BOOL, []),
    ]
    if extra_input:
        inputs.append(helper.make_tensor_value_info(p + "mystery:0", f, ["batch", 2]))
    outputs = [
        helper.make_tensor_value_info(p + "Reshape_3:0", f, ["batch", net.actions]),
        helper.make_tensor_value_info(p + "Reshape_4:0", f, ["batch"]),
        helper.make_tensor_value_info(h_out, f, ["batch", CELL]),
        helper.make_tensor_value_info(c_out, f, ["batch", CELL]),
    ]
    initializers = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    graph = helper.make_graph(nodes, "recurrent", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    extra = (
        ONNX_ROLES % net.actions
        if roles
        else f"  action_space: {{type: Discrete, n: {net.actions}}}\n"
    )
    (folder / "schema.yaml").write_text(SCHEMA.format(discrete=True, extra=extra))


def keras_policy(folder: Path, seed: int = 3) -> object:
    """A TF2 Keras export as RLlib's `policy.export_model(dir)` writes: outputs `fc_out`
    (the logits) and `value_out`, no action outputs. Returns the Keras model."""
    import keras

    keras.utils.set_random_seed(seed)
    observations = keras.Input((OBS,), name="observations")
    hidden = keras.layers.Dense(8, activation="tanh", name="fc_1")(observations)
    outputs = {
        "fc_out": keras.layers.Dense(3, name="fc_out")(hidden),
        "value_out": keras.layers.Dense(1, name="value_out")(hidden),
    }
    model = keras.Model(observations, outputs)
    model.export(str(folder / "export"), verbose=False)
    zip_folder(folder / "export", folder / "saved_model.zip")
    (folder / "schema.yaml").write_text(SCHEMA.format(discrete=True, extra=""))
    return model
