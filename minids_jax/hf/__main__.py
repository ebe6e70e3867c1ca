"""Hugging Face checkpoints in and out: deepseek_v3, deepseek_v2, llama, qwen2
(docs/huggingface.md).

    python -m minids_jax.hf import HF_DIR --workdir WD [--config C] [--max_seq_len N] [--nomtp]
    python -m minids_jax.hf export --workdir WD --out OUT [--step N] [--dtype bfloat16|float32]
        [--nomtp] [--adapter_only]
    python -m minids_jax.hf export --workdir WD --out OUT --format gguf
        [--dtype f32|f16|bf16|q8_0] [--step N]
    python -m minids_jax.hf make-tiny --family llama|qwen2|deepseek_v2|deepseek_v3 --out OUT

`import` writes WD as a run at step 0 of the model in HF_DIR (config.json, *.safetensors,
tokenizer files): load it with `minids_jax.load(WD)`, generate from it, train it with
`python train.py --config WD/config.py --workdir WD`, or start another run from it with
`--config.checkpoint.init_from=WD`. `--config` gives the rest of that run's config (mesh,
training, data); its model group is replaced by the imported one. `export` writes OUT for
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` and vLLM (a LoRA run merged, or with
`--adapter_only` its adapters for `peft.PeftModel.from_pretrained`). `make-tiny` writes a
small random model of a family, with a tokenizer and chat template, to practise on.
`--format gguf` writes OUT/model.gguf for llama.cpp and an Ollama OUT/Modelfile instead
(docs/serving.md; needs the `gguf` package).
"""

from __future__ import annotations

import pathlib
import shutil
import time

from absl import flags

from minids_jax import cli

_CONFIG = cli.define_config_flag(default=None)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory (import: a new one).")
_OUT = flags.DEFINE_string("out", None, "export: the directory to write.")
_STEP = flags.DEFINE_integer("step", None, "export: the checkpoint's step (default: latest).")
_FORMAT = flags.DEFINE_enum("format", "hf", ["hf", "gguf"], "export: a Hugging Face "
                            "directory (hf), or model.gguf and an Ollama Modelfile (gguf).")
# One flag for both formats, each with its own names; the default depends on --format.
HF_DTYPES, GGUF_DTYPES = ("bfloat16", "float32"), ("f32", "f16", "bf16", "q8_0")
_DTYPE = flags.DEFINE_string("dtype", None, "export: the dtype of the written weights: "
                             "bfloat16 (default) or float32 for --format=hf; f16 (default), "
                             "f32, bf16 or q8_0 for --format=gguf.")
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "export: the largest tensor file; "
                                   "past it the weights are sharded with an index.")
_MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", None, "import: the run's context and "
                                    "training window (default: max_position_embeddings).")
_BASE_MODEL = flags.DEFINE_string("base_model", None, "export --adapter_only: the base's "
                                  "directory or hub id for adapter_config.json (default: the "
                                  "Hugging Face directory the base was imported from).")
_ADAPTER_ONLY = flags.DEFINE_bool("adapter_only", False, "export of a LoRA run: write its "
                                  "adapters as a PEFT adapter instead of the merged model "
                                  "(routed experts' in peft's target_parameters form).")
_MTP = flags.DEFINE_bool("mtp", True, "Import/export the MTP layers when there are some.")
_FAMILY = flags.DEFINE_string("family", None, "make-tiny: llama, qwen2, deepseek_v2 or "
                              "deepseek_v3.")
USAGE = ("usage: python -m minids_jax.hf import HF_DIR --workdir WD | python -m minids_jax.hf "
         "export --workdir WD --out OUT | python -m minids_jax.hf make-tiny --family F --out OUT")


def main(argv: list[str]) -> None:
    from minids_jax import config as config_lib
    from minids_jax.workdir import WorkdirLock, writable_directory

    command, *rest = argv[1:] or [""]
    if command not in ("import", "export", "make-tiny") or len(rest) != (command == "import"):
        raise cli.UserError(f"{' '.join(argv[1:]) or 'no command'}: {USAGE}")
    if command == "make-tiny":
        if not (_FAMILY.value and _OUT.value):
            raise cli.UserError(f"make-tiny needs --family and --out; {USAGE}")
        from minids_jax.hf import tiny

        tiny.make_tiny(_FAMILY.value, writable_directory(_OUT.value, "--out"))
        return
    if not _WORKDIR.value:
        raise cli.UserError(f"--workdir is required; {USAGE}")
    from minids_jax.hf import convert

    started = time.perf_counter()
    if command == "import":
        config = (config_lib.Config() if _CONFIG.value is None
                  else cli.config_from_flag(_CONFIG))
        new = not pathlib.Path(_WORKDIR.value).expanduser().exists()
        workdir = writable_directory(_WORKDIR.value, "--workdir")
        try:
            with WorkdirLock(workdir):
                run_config = convert.import_dir(rest[0], workdir, config, with_mtp=_MTP.value,
                                                max_seq_len=_MAX_SEQ_LEN.value)
        except BaseException:
            if new:  # a refused import leaves no half-made run behind
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        from minids_jax import inspect

        sizes = inspect.sizes(run_config, 1)
        print(f"imported {rest[0]} into {workdir} ({inspect.count(sizes['parameters'])} "
              f"parameters, {time.perf_counter() - started:.1f} s); train it with: python train.py "
              f"--config {workdir}/config.py --workdir {workdir}")
        return
    if not _OUT.value:
        raise cli.UserError(f"export needs --out; {USAGE}")
    dtypes = GGUF_DTYPES if _FORMAT.value == "gguf" else HF_DTYPES
    dtype = _DTYPE.value or ("f16" if _FORMAT.value == "gguf" else "bfloat16")
    if dtype not in dtypes:
        raise cli.UserError(f"--dtype={dtype} is not a --format={_FORMAT.value} dtype; use one "
                            f"of {', '.join(dtypes)}.")
    if _FORMAT.value == "gguf" and _ADAPTER_ONLY.value:
        raise cli.UserError("--adapter_only writes a PEFT adapter; --format=gguf merges the "
                            "adapters into model.gguf: use one of them.")
    out = writable_directory(_OUT.value, "--out")
    if _FORMAT.value == "gguf":
        from minids_jax.hf import to_gguf

        to_gguf.export_gguf(_WORKDIR.value, out, step=_STEP.value, dtype=dtype)
        print(f"exported in {time.perf_counter() - started:.1f} s; serve it with: ollama create "
              f"NAME -f {out}/Modelfile, or llama-server -m {out}/model.gguf")
        return
    if _ADAPTER_ONLY.value:
        from minids_jax.hf import adapter

        adapter.export_adapter(_WORKDIR.value, out, step=_STEP.value,
                               base_model=_BASE_MODEL.value)
        return
    convert.export_run(_WORKDIR.value, out, step=_STEP.value, dtype=dtype,
                       max_shard_bytes=int(_MAX_SHARD_GB.value * 2**30), with_mtp=_MTP.value)
    print(f"exported in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    cli.run(main)
