"""Complete a prompt with a GPT checkpoint.

    python -m src.apps.gpt.generate config=<run>/config.yaml prompt="The " \
        [max_new_tokens=64 temperature=0.8 checkpoint=<checkpoint dir>]

The tokenizer is rebuilt from the run's config (a sentencepiece model comes back from its cache).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...nanollama.config import entrypoint
from ...nanollama.distributed import Cluster
from ...nanollama.trainer import checkpoint_to_evaluate
from .eval import EvalRunConfig, load_frozen
from .evaluation import complete


@dataclass
class GenerateConfig(EvalRunConfig):
    prompt: str = ""
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0: greedy


def run_generate(cfg: GenerateConfig) -> str:
    path = checkpoint_to_evaluate(cfg, cfg.checkpoint)
    with Cluster(cfg.cluster) as cluster:
        tokenizer, model = load_frozen(cfg, path, cluster.device)
        (text,) = complete(
            model, tokenizer, [cfg.prompt], cfg.max_new_tokens, cfg.temperature, cfg.orchestration.seed
        )
        if cluster.is_main:
            print(cfg.prompt + text)
    return text


main = entrypoint(GenerateConfig, run_generate)


if __name__ == "__main__":
    main()
