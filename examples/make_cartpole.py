"""Train the bundled example policy (CartPole) and export it like an RLlib SavedModel.

    python examples/make_cartpole.py [--out examples/cartpole]

Training is the cross-entropy method on a small MLP whose logits are sampled from while it is
evaluated, so the exported *stochastic* policy balances the pole; a linear value head is then
fitted to the discounted returns. The export has the signature layout of Pathmind's RLlib
exports: inputs `observations`, `prev_action`, `prev_reward`, `seq_lens`, `is_training`,
`timestep`; outputs `actions_0`, `action_dist_inputs`, `action_prob`, `action_logp`,
`vf_preds`. Needs the `examples` and `tensorflow` extras.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np

HIDDEN = 16
OBS, ACTIONS = 4, 2
SHAPES = [(OBS, HIDDEN), (HIDDEN,), (HIDDEN, ACTIONS), (ACTIONS,)]
GAMMA = 0.99

SCHEMA = """\
# The bundled example: a CartPole-v1 policy trained by examples/make_cartpole.py.
observations:
  cart_position:
    type: float
    description: Cart position along the track (m); the episode ends beyond +-2.4.
    minimum: -4.8
    maximum: 4.8
  cart_velocity:
    type: float
    description: Cart velocity (m/s).
  pole_angle:
    type: float
    description: Pole angle from upright (rad); the episode ends beyond +-0.21.
    minimum: -0.42
    maximum: 0.42
  pole_angular_velocity:
    type: float
    description: Pole angular velocity (rad/s).

parameters:
  discrete: True
  tuple: False
  api_key: "cartpole-demo-key"
"""


def unpack(theta: np.ndarray) -> list[np.ndarray]:
    parts, start = [], 0
    for shape in SHAPES:
        size = int(np.prod(shape))
        parts.append(theta[start : start + size].reshape(shape))
        start += size
    return parts


def hidden(params: list[np.ndarray], obs: np.ndarray) -> np.ndarray:
    return np.tanh(obs @ params[0] + params[1])


def logits(params: list[np.ndarray], obs: np.ndarray) -> np.ndarray:
    return hidden(params, obs) @ params[2] + params[3]


def episode(env: gym.Env, params: list[np.ndarray], rng: np.random.Generator, seed: int):
    obs, _ = env.reset(seed=seed)
    observations, rewards = [], []
    done = False
    while not done:
        z = logits(params, obs)
        p = np.exp(z - z.max())
        action = int(rng.random() * p.sum() > p[0])
        observations.append(obs)
        obs, reward, terminated, truncated, _ = env.step(action)
        rewards.append(reward)
        done = terminated or truncated
    return np.array(observations), np.array(rewards)


def train(seed: int, iterations: int, population: int, elite: int) -> list[np.ndarray]:
    env = gym.make("CartPole-v1")
    rng = np.random.default_rng(seed)
    size = sum(int(np.prod(s)) for s in SHAPES)
    mean, std = np.zeros(size), np.ones(size)
    for iteration in range(iterations):
        candidates = mean + std * rng.standard_normal((population, size))
        scores = np.array(
            [
                np.mean([episode(env, unpack(c), rng, seed * 1000 + k)[1].sum() for k in range(2)])
                for c in candidates
            ]
        )
        best = candidates[np.argsort(scores)[-elite:]]
        mean, std = best.mean(axis=0), best.std(axis=0) + 0.02
        print(
            f"iteration {iteration:2d}: mean return {scores.mean():6.1f}, best {scores.max():.0f}"
        )
        if scores[np.argsort(scores)[-elite:]].min() >= 500:
            break
    return unpack(mean)


def fit_value(params: list[np.ndarray], seed: int) -> tuple[np.ndarray, float]:
    """Least squares from hidden features to discounted returns: the value head."""
    env = gym.make("CartPole-v1")
    rng = np.random.default_rng(seed + 1)
    features, targets, lengths = [], [], []
    for k in range(20):
        observations, rewards = episode(env, params, rng, 10_000 + k)
        returns = np.zeros_like(rewards)
        running = 0.0
        for t in reversed(range(len(rewards))):
            running = rewards[t] + GAMMA * running
            returns[t] = running
        features.append(hidden(params, observations))
        targets.append(returns)
        lengths.append(len(rewards))
    x = np.concatenate(features)
    design = np.hstack([x, np.ones((len(x), 1))])
    solution, *_ = np.linalg.lstsq(design, np.concatenate(targets), rcond=None)
    print(f"stochastic policy: mean episode length {np.mean(lengths):.0f} over 20 episodes")
    return solution[:-1], float(solution[-1])


def export(params: list[np.ndarray], value: tuple[np.ndarray, float], out: Path) -> None:
    import tensorflow as tf

    w1, b1, w2, b2 = (tf.constant(p, tf.float32) for p in params)
    wv, bv = tf.constant(value[0], tf.float32), tf.constant(value[1], tf.float32)

    class Policy(tf.Module):
        @tf.function(
            input_signature=[
                tf.TensorSpec([None, OBS], tf.float32, name="observations"),
                tf.TensorSpec([None], tf.int64, name="prev_action"),
                tf.TensorSpec([None], tf.float32, name="prev_reward"),
                tf.TensorSpec([None], tf.int32, name="seq_lens"),
                tf.TensorSpec([], tf.bool, name="is_training"),
                tf.TensorSpec([], tf.int64, name="timestep"),
            ]
        )
        def serve(self, observations, prev_action, prev_reward, seq_lens, is_training, timestep):
            h = tf.tanh(tf.matmul(observations, w1) + b1)
            dist_inputs = tf.matmul(h, w2) + b2
            action = tf.random.categorical(dist_inputs, 1, dtype=tf.int64)[:, 0]
            logp = -tf.nn.sparse_softmax_cross_entropy_with_logits(action, dist_inputs)
            return {
                "actions_0": action,
                "action_dist_inputs": dist_inputs,
                "action_logp": logp,
                "action_prob": tf.exp(logp),
                "vf_preds": tf.linalg.matvec(h, wv) + bv,
            }

    module = Policy()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging:
        model_dir = Path(staging) / "model"
        tf.saved_model.save(module, str(model_dir), signatures={"serving_default": module.serve})
        with zipfile.ZipFile(out / "saved_model.zip", "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(model_dir.rglob("*")):
                archive.write(path, path.relative_to(model_dir).as_posix())
    (out / "schema.yaml").write_text(SCHEMA, encoding="utf-8")
    shutil.rmtree(out / "model", ignore_errors=True)
    print(f"wrote {out / 'saved_model.zip'} ({(out / 'saved_model.zip').stat().st_size} bytes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "cartpole")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--population", type=int, default=48)
    parser.add_argument("--elite", type=int, default=8)
    arguments = parser.parse_args()
    params = train(arguments.seed, arguments.iterations, arguments.population, arguments.elite)
    export(params, fit_value(params, arguments.seed), arguments.out)


if __name__ == "__main__":
    main()
