"""Train a Mini DeepSeek model.

    python train.py --config configs/tiny.py --workdir runs/tiny
    python train.py --config configs/mini.py --config.model.n_layers=12 --config.mesh.fsdp=-1
    python train.py --config configs/finetune.py --config.checkpoint.init_from=runs/base \
        --config.data.path=my.jsonl --workdir runs/ft     # the architecture is runs/base's

JAX is imported only after the flags are parsed, malloc is set to keep freed host memory,
the GPUs are chosen (CUDA_VISIBLE_DEVICES) and, for a multi-host job, jax.distributed is
started: all must precede any backend. Then compiled programs are kept on disk for later runs
(devices.compile_cache), before anything compiles.
"""

import socket

from absl import flags, logging

from minids_jax import cli

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")


def main(argv):
    del argv
    from minids_jax import startup

    startup.use_huge_pages(cli.wants_huge_pages(_CONFIG))  # first: it may run train.py again
    config = cli.config_from_flag(_CONFIG, _WORKDIR.value)
    gpus = startup.select_gpus(config.devices)
    visible = f"CUDA_VISIBLE_DEVICES={gpus.visible}: " if gpus.visible else ""
    # On a machine without NVIDIA's library the line says nothing: shown with --verbosity=1.
    logging.log(logging.INFO if gpus.visible or "NVML unavailable" not in gpus.reason
                else logging.DEBUG, "%s GPUs: %s%s", socket.gethostname(), visible, gpus.reason)
    job = startup.initialize_distributed(config.devices, gpus)
    if job:
        logging.info("%s jax.distributed: %s", socket.gethostname(), job)
    startup.keep_compiled_programs(config.devices)  # imports jax: after the GPUs are chosen

    import jax

    startup.check_local_devices(config.devices, jax.local_devices())
    from minids_jax.training import trainer

    trainer.run(config, _WORKDIR.value, on_second_interrupt=cli.exit_interrupted)


if __name__ == "__main__":
    cli.run(main)
