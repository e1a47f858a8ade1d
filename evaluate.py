"""Evaluate a sparsity mode against dense: lm-eval tasks and held-out perplexity.

python evaluate.py mode=sparse                                  # trained routers, tiny-opt, offline
python evaluate.py mode=sparse_attn sparsity.attn_topk=0.3      # oracle heads, no routers needed
python evaluate.py mode=sparse_attn sparsity.attn_topk=0.1,0.2,0.3,0.5,0.7,0.9 -m   # sweep + plot
python evaluate.py experiment=llama-3.1-8b-eval mode=sparse     # the paper's recipe (needs network)
"""

import hydra
from omegaconf import DictConfig

import polar_sparsity.config  # noqa: F401  (registers schemas and resolvers)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from polar_sparsity.entry import run_entry
    from polar_sparsity.evaluation.runner import run_evaluate
    from polar_sparsity.schema import EvaluateRunConfig

    run_entry(cfg, EvaluateRunConfig, run_evaluate)


if __name__ == "__main__":
    main()
