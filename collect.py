"""Collect router inputs, head output norms and MLP activity into an activation store.

python collect.py                                   # tiny-opt on the offline corpus
python collect.py model=tiny-llama
python collect.py model=opt-125m model.weights=random collect.samples=2000
python collect.py model=llama-3.1-8b data=wikitext2 device=cuda
"""

import hydra
from omegaconf import DictConfig

import polar_sparsity.config  # noqa: F401  (registers schemas and resolvers)


@hydra.main(version_base="1.3", config_path="conf", config_name="collect")
def main(cfg: DictConfig) -> None:
    from polar_sparsity.collect.runner import run_collect
    from polar_sparsity.entry import run_entry
    from polar_sparsity.schema import CollectRunConfig

    run_entry(cfg, CollectRunConfig, run_collect)


if __name__ == "__main__":
    main()
