"""Linear probes on a frozen GSSM checkpoint: which layer represents which hidden node's state?

    python -m src.apps.gssm.probe config=<run log dir>/config.yaml [checkpoint=<checkpoint dir>] \
        [probing.n_sequences=512 probing.test_fraction=0.25 ...]

On fresh sequences of the true model (their own RNG stream, neither train nor eval), the residual stream
at position t of every layer (0: the embeddings, l: the output of block l) is probed for each hidden
node's state at t, the state the token at t was emitted from, so tokens <= t carry the evidence. Test
accuracies per layer and node are printed next to chance (the majority state), the embeddings (what token
t alone gives away) and the Bayes filter argmax_z p(z_t | x_<=t) of the true model (the best any decoder
of tokens <= t can do on average; missing for nodes the tokens do not depend on), and written to
`<log dir>/metrics/probe_accuracy.json`: {"step", "checkpoint", ..., "results": [one entry per layer and
node]}.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch

from ...nanollama.config import entrypoint
from ...nanollama.distributed import Cluster
from ...nanollama.linear_probe import LinearProbeConfig, probe_accuracy, residual_streams
from ...nanollama.monitor.checkpoint import checkpoint_step
from ...nanollama.trainer import checkpoint_to_evaluate
from .bayes import filtered_marginals, joint_size
from .eval import EvalRunConfig, load_frozen
from .generator import GSSM, Sample

PROBE_STREAM = 3  # RNG stream of the probing sequences (data.py: 1 train, 2 eval)


@dataclass
class ProbeRunConfig(EvalRunConfig):
    probing: LinearProbeConfig = field(default_factory=LinearProbeConfig)


def bayes_accuracies(gssm: GSSM, sample: Sample, test: slice) -> dict[str, float]:
    """Accuracy of argmax_z p(z_t | x_<=t) on the test sequences; {} when the forward pass is intractable.
    Context nodes are decoded with the kernels of each sequence: an oracle, as for `bayes_loss`."""
    try:
        joint_size(gssm)
    except ValueError:
        return {}
    marginals = filtered_marginals(gssm, sample)
    return {
        name: float((p[test].argmax(-1) == sample.hidden[name][test]).mean()) for name, p in marginals.items()
    }


def run_probe(cfg: ProbeRunConfig) -> dict:
    path = checkpoint_to_evaluate(cfg, cfg.checkpoint)
    pc = cfg.probing
    with ExitStack() as stack:
        cluster = stack.enter_context(Cluster(cfg.cluster))
        gssm, model = load_frozen(cfg, path, cluster.device)
        rng = np.random.default_rng([cfg.orchestration.seed, PROBE_STREAM])
        sample = gssm.sample(pc.n_sequences, cfg.data.seq_len, rng)
        tokens = torch.from_numpy(sample.tokens).to(cluster.device)
        with cluster.autocast():
            streams = residual_streams(model, tokens, pc.batch_size)
        is_main = cluster.is_main
    n_train = pc.n_sequences - pc.n_test
    train, test = slice(None, n_train), slice(n_train, None)
    bayes = bayes_accuracies(gssm, sample, test)
    results = []
    for name in gssm.hidden_names:
        y = torch.from_numpy(sample.hidden[name])
        y_train, y_test = y[train].flatten(), y[test].flatten()
        for layer, h in enumerate(streams):
            x_train, x_test = h[train].flatten(0, 1), h[test].flatten(0, 1)
            score = probe_accuracy(x_train, y_train, x_test, y_test, pc.weight_decay, pc.max_iter)
            results.append({"node": name, "layer": layer, **score})
    embeddings = {r["node"]: r["accuracy"] for r in results if r["layer"] == 0}
    for r in results:
        r.update(embedding_accuracy=embeddings[r["node"]], bayes_accuracy=bayes.get(r["node"]))
    report = {
        "step": checkpoint_step(path),
        "checkpoint": str(path),
        "n_train_sequences": n_train,
        "n_test_sequences": pc.n_test,
        "seq_len": cfg.data.seq_len,
        "results": results,
    }
    out = path.parent.parent / "metrics" / "probe_accuracy.json"
    if is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(format_table(results))
        print(f"step {report['step']}: wrote {out}")
    return report


def format_table(results: list[dict]) -> str:
    """One row per node and layer: test accuracy, chance, the embeddings' accuracy and Bayes'."""
    lines = [f"{'node':<12} {'layer':>5} {'accuracy':>9} {'chance':>7} {'embeddings':>10} {'bayes':>6}"]
    for r in results:
        bayes = "-" if r["bayes_accuracy"] is None else f"{r['bayes_accuracy']:.3f}"
        lines.append(
            f"{r['node']:<12} {r['layer']:>5} {r['accuracy']:>9.3f} {r['chance']:>7.3f} "
            f"{r['embedding_accuracy']:>10.3f} {bayes:>6}"
        )
    return "\n".join(lines)


main = entrypoint(ProbeRunConfig, run_probe)


if __name__ == "__main__":
    main()
