"""Complete prompts with the decoding engine: dense, or sparse with the trained routers.

python generate.py                                              # tiny-opt, dense, the shipped prompts
python generate.py mode=sparse                                  # head routers from train.py
python generate.py prompts='["The import statement"]' decode.max_new_tokens=32
python generate.py model=tiny-llama mode=sparse prompts_file=my_prompts.jsonl decode.temperature=0.8
"""

import hydra
from omegaconf import DictConfig

import polar_sparsity.config  # noqa: F401  (registers schemas and resolvers)


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    from polar_sparsity.decode.runner import run_generate
    from polar_sparsity.entry import run_entry
    from polar_sparsity.schema import GenerateRunConfig

    run_entry(cfg, GenerateRunConfig, run_generate)


if __name__ == "__main__":
    main()
