"""Calibrate the MLP top-k per layer and decode batch size from the MLP routers and their store.

python calibrate.py                                            # tiny-opt: every MLP router in the bundle
python calibrate.py calibrate.batch_sizes=[1,8,64] calibrate.target_recall=0.95
python calibrate.py model=opt-6.7b data=wikitext2 device=cuda  # the paper's setting
"""

import hydra
from omegaconf import DictConfig

import polar_sparsity.config  # noqa: F401  (registers schemas and resolvers)


@hydra.main(version_base="1.3", config_path="conf", config_name="calibrate")
def main(cfg: DictConfig) -> None:
    from polar_sparsity.entry import run_entry
    from polar_sparsity.schema import CalibrateRunConfig
    from polar_sparsity.sparsity.calibrate_task import run_calibrate

    run_entry(cfg, CalibrateRunConfig, run_calibrate)


if __name__ == "__main__":
    main()
