"""Runs the entry points on bad inputs and faults, and prints what a user sees as a markdown
table (docs/errors.md):

    JAX_PLATFORMS=cpu python scripts/bad_inputs.py > docs/errors.md

Each case is a real command in a fresh temporary directory; the table gives its exit status and
the last line it printed. A case whose output holds a traceback is marked, since that is a bug.
Takes a few minutes on a CPU (it trains one tiny run to have checkpoints to damage).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The tests' tiny run (29k parameters), config files holding it, and a train.py with slow steps.
from tests.factories import SLOW_TRAIN, config_file, tiny_config  # noqa: E402

HOLDER = ("import sys, time; from minids_jax.workdir import WorkdirLock; lock = WorkdirLock("
          "sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(600)")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


class Cases:
    def __init__(self, scratch: pathlib.Path):
        self.scratch, self.rows, self.count = scratch, [], 0

    def config(self, **groups) -> str:
        """A config file holding tiny_config(**groups)."""
        self.count += 1
        return config_file(self.scratch, tiny_config(**groups), f"config{self.count}.py")

    def path(self, name: str) -> pathlib.Path:
        return self.scratch / name

    def run(self, what: str, args: list[str], shown: str | None = None, **kwargs):
        result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600,
                                **{"env": ENV, **kwargs})
        self.record(what, shown or " ".join(args[1:]), result.returncode,
                    result.stdout + result.stderr)
        return result

    def record(self, what: str, command: str, status: int, output: str) -> None:
        lines = [line for line in output.strip().splitlines() if line.strip()
                 and (status != 0 or not line[:1] in "IW" or not line[1:5].isdigit())]
        last = lines[-1] if lines else ""
        if "Traceback" in output or "Exception ignored" in output:
            last = f"TRACEBACK: {last}"
        command = command.replace(str(self.scratch), "/tmp/x").replace(sys.executable, "python")
        last = last.replace(str(self.scratch), "/tmp/x")
        self.rows.append((what, command, status, last))
        print(f"{status:4} {what}", file=sys.stderr, flush=True)

    def train(self, what: str, *flags: str, config: str | None = None, **kwargs):
        return self.run(what, [sys.executable, "train.py", "--config",
                               config or "configs/tiny.py", *flags], **kwargs)

    def table(self) -> str:
        def cell(text) -> str:
            return str(text).replace("|", "\\|").replace("\n", " ")

        lines = ["| input or fault | command | exit | the last line the user sees |",
                 "|---|---|---|---|"]
        lines += [f"| {cell(w)} | `{cell(c)}` | {s} | {cell(last)} |"
                  for w, c, s, last in self.rows]
        return "\n".join(lines)


def config_cases(c: Cases) -> None:
    c.train("missing config file", config="configs/nope.py")
    c.path("broken.py").write_text("def get_config(:\n")
    c.train("config file with a syntax error", config=str(c.path("broken.py")))
    c.path("empty.py").write_text("x = 1\n")
    c.train("config file without get_config()", config=str(c.path("empty.py")))
    c.train("typo in an override's field", "--config.model.d_modle=128")
    c.train("typo in an override's group", "--config.modle.d_model=128")
    c.train("a field that moved to another group", "--config.model.dtype=bfloat16")
    c.train("a value of the wrong type", "--config.model.d_model=wide")
    c.train("a value out of range", "--config.optim.lr=-1")
    c.train("a value not among the choices", "--config.compute.dtype=float8")
    c.train("heads that do not divide the width", "--config.model.n_heads=3")
    c.train("vocabulary too small for text", "--config.model.vocab_size=100")
    c.train("unknown flag", "--wrkdir=runs/x")
    lora = ["--config.lora.rank=2", "--config.lora.dropout=0.1"]
    c.train("LoRA dropout of the whole input", "--config.lora.rank=2", "--config.lora.dropout=1")
    c.train("LoRA dropout on routed experts' adapters", *lora,
            "--config.lora.targets=('attn.*','moe.w1')")
    c.train("a quantized base without LoRA", "--config.lora.base_quant=nf4")
    c.train("NF4 on widths that are no multiple of its blocks", "--config.lora.rank=2",
            "--config.lora.base_quant=nf4", config=c.config())
    c.train("a device memory that is no size", "--config.devices.memory=lots")
    c.train("a run that cannot fit devices.memory", "--config.devices.memory=10KB",
            config=c.config())
    c.run("a memory plan for devices the mesh does not divide",
          [sys.executable, "-m", "minids_jax.inspect", "--config", "configs/tiny.py", "--memory",
           "--devices", "3", "--config.mesh.fsdp=2"])
    c.train("a mesh larger than the machine", "--config.mesh.data=3", config=c.config())
    c.train("more GPUs than the machine has", "--config.devices.num_gpus=4", config=c.config())
    c.train("batch not divisible by the mesh", "--config.train.batch_size=3",
            "--config.mesh.data=2", config=c.config(),
            env={**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})


def path_and_data_cases(c: Cases) -> None:
    config = c.config()
    c.path("a_file").write_text("")
    c.train("workdir is a regular file", "--workdir", str(c.path("a_file")), config=config)
    readonly = c.path("readonly")
    readonly.mkdir()
    script = (f"mount -t tmpfs tmpfs {readonly} && mount -o remount,ro {readonly} && exec "
              f"{sys.executable} train.py --config {config} --workdir {readonly}/run")
    c.run("workdir on a read-only filesystem", ["unshare", "-rm", "sh", "-c", script],
          shown="train.py --config ... --workdir /tmp/x/readonly/run")
    text = ["--config.data.source=text"]
    c.train("data.path does not exist", *text, f"--config.data.path={c.path('missing.txt')}")
    c.path("empty_dir").mkdir()
    (c.path("empty_dir") / "a.txt").write_text("")
    c.train("an empty corpus", *text, f"--config.data.path={c.path('empty_dir')}")
    c.path("bad.jsonl").write_text('{"instruction": "hi", "output": "yo"}\n{"instruction": \n')
    c.train("malformed jsonl", "--config.data.source=jsonl",
            f"--config.data.path={c.path('bad.jsonl')}")
    chat = {"not a list": {"messages": "Hi"},
            "an unknown role": {"messages": [{"role": "human", "content": "Hi"}]},
            "a turn without its text": {"conversations": [{"from": "human"}]},
            "no assistant turn": {"messages": [{"role": "user", "content": "Hi"}]},
            "a system turn in the middle": {"messages": [
                {"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."},
                {"role": "assistant", "content": "Hello"}]}}
    for what, record in chat.items():
        c.path("chat.jsonl").write_text(json.dumps(record) + "\n")
        c.train(f"chat records: {what}", "--config.data.source=jsonl",
                f"--config.data.path={c.path('chat.jsonl')}")
    c.train("a tokens directory without token files", "--config.data.source=tokens",
            f"--config.data.path={c.path('empty_dir')}")
    c.run("prepare: --out is a file", [sys.executable, "-m", "minids_jax.prepare", "--config",
                                       "configs/tiny.py", "--out", str(c.path("a_file"))])
    c.run("prepare: a source it cannot tokenize", [
        sys.executable, "-m", "minids_jax.prepare", "--config", "configs/tiny.py",
        "--config.data.source=random", "--out", str(c.path("out"))])
    c.run("plot: not a run", [sys.executable, "-m", "minids_jax.plot", str(c.path("empty_dir"))])


def checkpoint_cases(c: Cases) -> None:
    config, run = c.config(), c.path("run")
    c.train("(a good run, to damage below)", "--workdir", str(run), config=config)

    def copy(name: str) -> pathlib.Path:
        shutil.copytree(run, c.path(name))
        return c.path(name)

    c.train("resume with another architecture", "--workdir", str(copy("arch")),
            config=c.config(model=dict(d_model=64)))
    c.train("resume past optim.total_steps", "--workdir", str(copy("past")),
            config=c.config(optim=dict(total_steps=3)))
    c.train("resume a run that is complete", "--workdir", str(copy("done")), config=config)
    c.train("init_from does not exist", "--workdir", str(c.path("new")),
            f"--config.checkpoint.init_from={c.path('nothing')}", config=config)
    c.train("init_from with another architecture", "--workdir", str(c.path("new2")),
            f"--config.checkpoint.init_from={run}", config=c.config(model=dict(n_layers=2)))
    c.train("init_from and a model override", "--workdir", str(c.path("new3")),
            f"--config.checkpoint.init_from={run}", "--config.model.n_heads=4", config=config)
    finetune = "configs/finetune.py"
    c.train("finetune config without init_from and data.path", "--workdir",
            str(c.path("ft")), config=finetune)
    c.train("finetune config without data.path", "--workdir", str(c.path("ft")),
            f"--config.checkpoint.init_from={run}", config=finetune)
    base, lora = copy("base"), ["--config.lora.rank=2", "--workdir", str(c.path("lora"))]
    c.train("(a LoRA run on a base, to move below)", *lora,
            f"--config.checkpoint.init_from={base}", config=config)
    base.rename(c.path("base_moved"))
    c.train("a LoRA run whose base moved: resume", *lora, "--config.optim.total_steps=9",
            f"--config.checkpoint.init_from={base}", config=config)
    c.run("a LoRA run whose base moved: generate", [
        sys.executable, "generate.py", "--workdir", str(c.path("lora")), "--max_new_tokens", "4"])
    for name, damage in (("truncated", truncate), ("scribbled", scribble)):
        damaged = copy(name)
        damage(damaged / "checkpoints" / "6")
        c.train(f"a {name} checkpoint: resume", "--workdir", str(damaged),
                config=c.config(optim=dict(total_steps=9)))
        c.run(f"a {name} checkpoint: generate", [
            sys.executable, "generate.py", "--workdir", str(damaged), "--max_new_tokens", "4"])
    fallback = copy("fallback")
    scribble(fallback / "checkpoints" / "6")
    c.train("a scribbled checkpoint with fallback=True (trains on)", "--workdir",
            str(fallback), "--config.checkpoint.fallback=True",
            config=c.config(optim=dict(total_steps=9)))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    c.train("a second run on a workdir in use", "--workdir", str(run), config=config)
    holder.kill()
    holder.wait()
    c.train("a NaN loss (lr 1e9)", "--workdir", str(c.path("nan")), "--config.optim.lr=1e9",
            config=config)
    generate = [sys.executable, "generate.py", "--workdir"]
    c.run("generate: no such workdir", [*generate, str(c.path("nothing"))])
    c.run("generate: --max_new_tokens -5", [*generate, str(run), "--max_new_tokens", "-5"])
    c.run("generate: --temperature -1", [*generate, str(run), "--temperature", "-1"])
    c.run("generate: --step 999", [*generate, str(run), "--step", "999"])
    c.run("generate: a prompt longer than the context", [*generate, str(run), "--prompt",
                                                         "x" * 40])


def hf_cases(c: Cases) -> None:
    hf = [sys.executable, "-m", "minids_jax.hf"]
    def broken(name: str, change, family: str = "hf") -> str:
        shutil.copytree(REPO / "tests" / "fixtures" / f"{family}_tiny", c.path(name))
        change(c.path(name))
        return str(c.path(name))

    def edit(**fields):
        def change(directory: pathlib.Path):
            config = json.loads((directory / "config.json").read_text())
            (directory / "config.json").write_text(json.dumps({**config, **fields}))
        return change

    def cut(directory: pathlib.Path):
        data = (directory / "model.safetensors").read_bytes()
        (directory / "model.safetensors").write_bytes(data[:len(data) // 2])

    for what, directory in (
            ("hf import: no config.json", broken("no_config", lambda d: (d / "config.json")
                                                  .unlink())),
            ("hf import: another model_type", broken("mistral", edit(model_type="mistral"))),
            ("hf import: a field the model cannot honour",
             broken("bias", edit(attention_bias=True))),
            ("hf import: a truncated tensor file", broken("cut", cut)),
            ("hf import: a tensor of the wrong shape",
             broken("shape", edit(moe_intermediate_size=16))),
            ("hf import: a qwen2 with sliding-window attention",
             broken("sliding", edit(use_sliding_window=True), "qwen2")),
            ("hf import: a llama with an unknown RoPE scaling",
             broken("longrope", edit(rope_scaling={"rope_type": "longrope", "factor": 2.0}),
                    "llama")),
            ("hf import: a llama whose KV heads do not divide the heads",
             broken("kv_heads", edit(num_key_value_heads=3), "llama")),
            ("hf import: a DeepSeek-V2 with another top-k method",
             broken("topk", edit(topk_method="noaux_tc"), "deepseek_v2"))):
        c.run(what, [*hf, "import", directory, "--workdir", str(c.path("imported"))])
    c.run("hf export: a model the format cannot express (MHLA)",
          [*hf, "export", "--workdir", str(c.path("run")), "--out", str(c.path("exported"))])


def fault_cases(c: Cases) -> None:
    config = c.config(checkpoint=dict(every=2))
    disk = c.path("full/checkpoints")
    disk.mkdir(parents=True)
    script = (f"mount -t tmpfs -o size=1400k tmpfs {disk} && exec {sys.executable} train.py "
              f"--config {config} --workdir {disk.parent}")
    c.run("disk full at the third save (a 1.4 MB filesystem)", ["unshare", "-rm", "sh", "-c",
                                                               script],
          shown="train.py --config ... --workdir /tmp/x/full")
    c.path("slow_train.py").write_text(SLOW_TRAIN.format(train=str(REPO / "train.py")))
    process = subprocess.Popen(
        [sys.executable, str(c.path("slow_train.py")), "--config",
         c.config(optim=dict(total_steps=50)), "--workdir", str(c.path("ctrl_c"))], cwd=REPO,
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "step 1/50" in line:
            import signal
            import time
            time.sleep(0.5)
            process.send_signal(signal.SIGINT)
        if "SIGINT received" in line:
            process.send_signal(signal.SIGINT)
    process.wait()
    c.record("Ctrl-C twice", "train.py ... then Ctrl-C, Ctrl-C", process.returncode,
             "".join(lines))


def truncate(step_dir: pathlib.Path) -> None:
    victim = max((p for p in (step_dir / "model").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])


def scribble(step_dir: pathlib.Path) -> None:
    victim = max((p for p in (step_dir / "model").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as file:
        file.seek(victim.stat().st_size // 2)
        file.write(os.urandom(4096))


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        cases = Cases(pathlib.Path(scratch))
        for group in (config_cases, path_and_data_cases, checkpoint_cases, hf_cases,
                      fault_cases):
            group(cases)
        table = cases.table()
    print(textwrap.dedent("""\
        # What a mistake looks like

        Every command ends a user's mistake or a fault of the machine with one `error: ...`
        line that names the problem and the fix, and exit status 2 (130 after Ctrl-C); a
        traceback means a bug, so please report it. Each row below is a real run, made by
        `JAX_PLATFORMS=cpu python scripts/bad_inputs.py > docs/errors.md`; `/tmp/x` is its
        scratch directory. The run that trains on after a damaged checkpoint and the one that
        finds its run complete exit 0 by design.
        """))
    print(table)
    print(json.dumps({"cases": len(cases.rows)}), file=sys.stderr)


if __name__ == "__main__":
    main()
