"""Train per-layer routers from an activation store and export them into the router bundle.

python train.py router=mha layer=3                     # one head router (tiny-opt, top-k 0.5)
python train.py router=mha layer='range(0,4)' -m       # a sweep: one job per layer + a summary
python train.py router=mlp layer='range(0,4)' -m       # MLP-neuron routers (ReLU models)
python train.py model=tiny-llama router.topk=0.25 layer=2        # GQA: one score per KV group
python train.py layer='range(0,32)' trainer=gpu hydra/launcher=parallel -m
"""

import hydra
from omegaconf import DictConfig

import polar_sparsity.config  # noqa: F401  (registers schemas and resolvers)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from polar_sparsity.entry import run_entry
    from polar_sparsity.routers.task import run_train
    from polar_sparsity.schema import TrainRunConfig

    run_entry(cfg, TrainRunConfig, run_train)


if __name__ == "__main__":
    main()
