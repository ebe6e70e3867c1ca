"""Time and peak host memory of `python -m minids_jax.hf export` (Hugging Face and GGUF) and
`import`.

    python benchmarks/hf_interop.py --config configs/v3_mini.py --config.model.n_layers=2 \
        --config.model.mtp_depth=0                      # a random model of about 120M params
    python benchmarks/hf_interop.py --hf_dir tests/fixtures/hf_tiny   # import only

Each step runs as its own process (the CLI a user runs), and its peak resident memory is that
process's own (`ru_maxrss` from `os.wait4`). With `--config`, a random model of that config is saved
as a run first (with a small BPE tokenizer, which GGUF needs), then exported (float32 and
bfloat16; with `--gguf`, also as GGUF at f16 and q8_0) and the float32 export imported back.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minids_jax import cli  # noqa: E402
from minids_jax.data.tokenization import TOKENIZER_FILE, BpeTokenizer  # noqa: E402

_CONFIG = cli.define_config_flag(default=None)
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Import this Hugging Face directory instead.")
_GGUF = flags.DEFINE_bool("gguf", False, "Also export as GGUF (needs the gguf package).")

SAVE_RANDOM = """
import sys
from flax import nnx
from minids_jax import checkpoint
from minids_jax import config as config_lib
from minids_jax.model import build, count_params
config = config_lib.from_json(open(sys.argv[1]).read())
model = build(config, "cpu", nnx.Rngs(0))
checkpoint.save_model(sys.argv[2], config, nnx.to_pure_dict(nnx.state(model)))
print(f"parameters {count_params(model):,}")
"""


def timed(label: str, argv: list[str]) -> str:
    """Runs `argv`, prints its wall time and peak resident memory, returns its stdout."""
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
               PYTHONPATH=str(REPO))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen(argv, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, unlike getrusage
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status):
            sys.exit(f"{label} failed:\n{err.read()[-2000:]}")
        print(f"{label}: {seconds:.1f} s, peak RSS {usage.ru_maxrss / 1024:,.0f} MB")
        return out.read()


def directory_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main(argv):
    del argv
    hf = [sys.executable, "-m", "minids_jax.hf"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if _HF_DIR.value:
            timed("import", hf + ["import", _HF_DIR.value, "--workdir", str(tmp / "run")])
            return
        if _CONFIG.value is None:
            raise cli.UserError("pass --config (a model to make) or --hf_dir (one to import).")
        config = cli.config_from_flag(_CONFIG)
        config = dataclasses.replace(config, data=dataclasses.replace(  # (the tokenizer's)
            config.data, tokenizer="bpe", source="text", path=str(REPO / "README.md")))
        (tmp / "config.json").write_text(config.to_json())
        out = timed("save a random model",
                    [sys.executable, "-c", SAVE_RANDOM, str(tmp / "config.json"),
                     str(tmp / "run")])
        print(out.strip())
        BpeTokenizer.train([(REPO / "README.md").read_text()] * 3, 2000).save(
            tmp / "run" / TOKENIZER_FILE)
        for dtype in ("f16", "q8_0") if _GGUF.value else ():
            timed(f"export gguf ({dtype})", hf + ["export", "--workdir", str(tmp / "run"),
                                                  "--out", str(tmp / dtype), "--format", "gguf",
                                                  "--dtype", dtype])
            print(f"  {directory_mb(tmp / dtype):,.0f} MB written")
        for dtype in ("float32", "bfloat16"):
            timed(f"export ({dtype})", hf + ["export", "--workdir", str(tmp / "run"), "--out",
                                             str(tmp / f"hf_{dtype}"), "--dtype", dtype])
            print(f"  {directory_mb(tmp / f'hf_{dtype}'):,.0f} MB written")
        timed("import (float32 files)", hf + ["import", str(tmp / "hf_float32"), "--workdir",
                                               str(tmp / "imported")])


if __name__ == "__main__":
    cli.run(main)
