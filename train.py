"""Train a Mini DeepSeek model.

    python train.py --config configs/tiny.py --workdir runs/tiny
    python train.py --config configs/mini.py --config.model.n_layers=12 --config.mesh.fsdp=-1

JAX is imported only after the flags are parsed, so the GPU choice can set
CUDA_VISIBLE_DEVICES before any backend starts.
"""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Path to a config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")


def main(argv):
    del argv
    from minids_jax import config as config_lib
    from minids_jax import trainer

    config = config_lib.from_config_dict(_CONFIG.value)
    trainer.run(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
