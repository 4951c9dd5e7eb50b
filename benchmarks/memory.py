"""Peak memory of the streamed `modularize` and `compress` steps against the number of experts (not a test).

Writes a random BERT base (default 24 layers, hidden 1024, intermediate 4096, vocab 30522: ~335M parameters,
float32 ~1.3 GB) and 8 experts (base + seeded noise on every tensor, a 2-class head each) as Hugging Face
folders under --workdir (default: a temporary folder), then runs each measurement in a fresh Python process,
which reports its own peak RSS: VmHWM of /proc/self/status, the high-water mark of its memory since it started
(file pages it mapped included). Not getrusage's ru_maxrss: Linux carries the parent's high-water mark into a
child at exec, so a child of this (larger) process would report at least the parent's peak.
  - `tasks.modularize.modularize` (task arithmetic) over 2, 4 and 8 experts (--counts);
  - `tasks.compress.compress` of one expert with params.yaml's `compress` section (the default: a 2% byte
    budget, int4/int2 factors, the embeddings' SVD on the Gram path) against the shared model of the most experts;
  - for information: the fixed overhead (imports only) and compress once more with `gram_svd_mib: null`
    (LAPACK's SVD for every matrix, as before the Gram path);
  - with --static, a static baseline's stage for each count: `StaticMethod.build` of task arithmetic over a
    2-point scaling grid, each point scored on a small validation set (16 inputs per expert, a word tokenizer
    written here), the chosen backbone written. Scoring needs one float32 backbone in memory (about 1 x model).
The steps get a `Params` built in code with their sections only (experts, merge, compress); compress is also
measured as its stage runs it, `twinmerge compress` on a project made of the synthetic folders (`cli_project`),
which reads params.yaml with `load_params(registry=False)`: a full check of `methods` would import
twinmerge.methods and transformers (+~140 MiB, fixed; reported as "full params check import overhead").
The synthetic experts are deleted at the end unless --keep. Threads: 2.

    python benchmarks/memory.py [--layers 2 --hidden 128 --intermediate 512] [--counts 2,4,8]
                                [--workdir DIR] [--keep] [--static | --only-static]
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREADS = "2"
MIB = 2**20


def make_experts(workdir: Path, config: dict, n: int, noise: float = 0.01) -> int:
    """Write base/ (BertModel) and checkpoints/e0..e{n-1} (BertForSequenceClassification, base + noise) with
    the streaming writer, one tensor in memory at a time. Returns one expert's float32 backbone bytes."""
    import torch
    from transformers import BertConfig, BertModel

    from twinmerge.io import SafetensorsWriter

    bert = BertConfig(**config)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in BertModel(bert).state_dict().items()}
    head = {"classifier.weight": (2, bert.hidden_size), "classifier.bias": (2,)}

    def base_tensor(key):
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        if key.endswith("LayerNorm.weight"):
            return torch.ones(shapes[key])
        return 0.02 * torch.randn(shapes[key], generator=g) if key.endswith("weight") else torch.zeros(shapes[key])

    def write(folder, specs, tensors, arch, **extra):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({**bert.to_dict(), "architectures": [arch], **extra}))
        with SafetensorsWriter(folder / "model.safetensors", specs, {"format": "pt"}) as out:
            for key, t in tensors:
                out.write(key, t)

    f32 = torch.float32
    write(workdir / "base", [(k, s, f32) for k, s in shapes.items()], ((k, base_tensor(k)) for k in shapes),
          "BertModel")
    def expert_tensors(i):
        g = torch.Generator().manual_seed(1000 + i)
        for k, s in shapes.items():
            yield f"bert.{k}", base_tensor(k) + noise * torch.randn(s, generator=g)
        for k, s in head.items():
            yield k, 0.02 * torch.randn(s, generator=g)

    specs = [(f"bert.{k}", s, f32) for k, s in shapes.items()] + [(k, s, f32) for k, s in head.items()]
    for i in range(n):
        write(workdir / "checkpoints" / f"e{i}", specs, expert_tensors(i), "BertForSequenceClassification",
              id2label={"0": "a", "1": "b"}, label2id={"a": 0, "b": 1})
    return sum(math.prod(s) for s in shapes.values()) * 4


def step_params(workdir: Path, n: int, **compress):
    """A Params for the steps: n experts under workdir/checkpoints, task arithmetic 0.3, params.yaml's `compress`
    section (updated with `compress`). Built without validating `methods` (which imports twinmerge.methods and
    transformers, see the module doc)."""
    import yaml

    from tasks.params import CompressParams, ExpertSpec, MergeParams, MethodsParams, Params

    experts = {f"e{i}": ExpertSpec(path=str(workdir / "checkpoints" / f"e{i}"), task="movie", data="unused")
               for i in range(n)}
    merge = MergeParams(method="task_arithmetic", options={"scaling": 0.3})
    section = yaml.safe_load((ROOT / "params.yaml").read_text())["compress"]
    return Params.model_construct(experts=experts, merge=merge, compress=CompressParams(**{**section, **compress}),
                                  methods=MethodsParams.model_construct())


def cli_project(workdir: Path, n: int) -> Path:
    """workdir as a project for the `twinmerge` command: artifacts/{base,checkpoints,shared} linked to the
    synthetic folders, and params.yaml = the default's with its experts replaced by e0..e{n-1}. Made the working
    directory (the steps read artifacts/ relative to it); returns the params file."""
    import os

    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["experts"] = {f"e{i}": {"path": str(workdir / "checkpoints" / f"e{i}"), "task": "movie",
                                "data": str(workdir)} for i in range(n)}
    raw["merge"] = {"method": "task_arithmetic", "options": {"scaling": 0.3}}
    (workdir / "artifacts").mkdir(exist_ok=True)
    for name in ("base", "checkpoints", "shared"):
        link = workdir / "artifacts" / name
        if not link.exists():
            link.symlink_to(workdir / name)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw))
    os.chdir(workdir)
    return workdir / "params.yaml"


def child(kind: str, workdir: Path, n: int) -> None:
    """One measurement, in this fresh process; prints {"peak_mib", "wall_s"} as JSON on the last line."""
    import torch
    torch.set_num_threads(int(THREADS))
    start = time.perf_counter()
    dirs = {"base_dir": workdir / "base", "checkpoints_dir": workdir / "checkpoints"}
    if kind == "imports":
        import tasks.compress  # noqa: F401
        import tasks.modularize  # noqa: F401
    elif kind == "cli_imports":
        import tasks.compress  # noqa: F401
        import twinmerge.methods  # noqa: F401 - what load_params(params.yaml) imports to validate `methods`
    elif kind == "modularize":
        from tasks.modularize import modularize
        modularize(step_params(workdir, n), workdir / "shared", **dirs)
    elif kind in ("compress", "compress_lapack"):
        from tasks.compress import compress
        params = step_params(workdir, n, **({"gram_svd_mib": None} if kind == "compress_lapack" else {}))
        compress(params, "e0", workdir / "shared", workdir / kind, progress=False, **dirs)
    elif kind == "compress_cli":  # the real command, as the `compress@e0` stage runs it
        from tasks.cli import main
        if main(["compress", "--params", str(cli_project(workdir, n)), "--expert", "e0", "--no-progress"]):
            sys.exit("twinmerge compress failed")
    elif kind == "static":  # a static baseline's stage: grid merges, each scored on validation, the best written
        from transformers import BertTokenizerFast

        from twinmerge.io import ExpertSet
        from twinmerge.methods import METHODS, Context
        from twinmerge.taskpool import TaskPool

        pool = ExpertSet(dirs["base_dir"], {f"e{i}": dirs["checkpoints_dir"] / f"e{i}" for i in range(n)})
        words = [f"w{i}" for i in range(200)]
        vocab = workdir / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
        tokenizer = BertTokenizerFast(vocab_file=str(vocab))
        split = {name: ([" ".join(words[(7 * j + k) % 200] for k in range(12)) for j in range(16)],
                        [j % 2 for j in range(16)]) for name in pool.names}
        val = TaskPool(pool, split, {name: "accuracy" for name in pool.names}, tokenizer, 16, 32)
        ctx = Context(pool, val, {name: 50.0 for name in pool.names}, progress=False)
        out = workdir / "static" / f"n{n}"
        out.parent.mkdir(exist_ok=True)
        METHODS["task_arithmetic"].build(ctx, out, {"scaling": [0.3, 0.5]})
        shutil.rmtree(out)
    status = Path("/proc/self/status").read_text().split("VmHWM:")[1]
    peak = int(status.split()[0]) / 1024  # kB
    print(json.dumps({"peak_mib": peak, "wall_s": time.perf_counter() - start}))


def measure(kind: str, workdir: Path, n: int = 0) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS, "TQDM_DISABLE": "1",
           "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", kind, "--workdir", str(workdir), "--n", str(n)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"child {kind} {n} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args, workdir: Path) -> None:
    import psutil
    import torch

    torch.set_num_threads(int(THREADS))
    counts = sorted(args.counts)
    config = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=max(1, args.hidden // 64), intermediate_size=args.intermediate,
                  max_position_embeddings=512)
    t0 = time.perf_counter()
    model_bytes = make_experts(workdir, config, counts[-1])
    on_disk = sum(f.stat().st_size for f in (workdir / "checkpoints").rglob("*.safetensors"))
    memory = psutil.virtual_memory().total
    print(f"model: {config}: {model_bytes // 4:,} parameters, float32 {model_bytes / MIB:.1f} MiB per expert")
    print(f"created base + {counts[-1]} experts in {time.perf_counter() - t0:.0f} s: experts {on_disk / 2**30:.2f} "
          f"GiB on disk = {on_disk / memory:.2f} x this machine's memory ({memory / 2**30:.1f} GiB)", flush=True)
    if not args.only_static:
        for kind, label in [("imports", "fixed overhead (import tasks.modularize, tasks.compress)"),
                            ("cli_imports", "full params check import overhead "
                                            "(+ twinmerge.methods: load_params(registry=True))")]:
            print(f"{label} = {measure(kind, workdir)['peak_mib']:.0f} MiB", flush=True)
        peaks = {}
        for n in counts:
            r = measure("modularize", workdir, n)
            peaks[n] = r["peak_mib"]
            print(f"peak RSS modularize {n} experts = {r['peak_mib']:.0f} MiB (wall {r['wall_s']:.0f} s)", flush=True)
        r = measure("compress", workdir, counts[-1])
        print(f"peak RSS compress 1 expert = {r['peak_mib']:.0f} MiB (wall {r['wall_s']:.0f} s; compress: "
              f"{step_params(workdir, 0).compress.model_dump()})", flush=True)
        cli = measure("compress_cli", workdir, counts[-1])
        print(f"peak RSS `twinmerge compress` (the stage's command: CLI, params.yaml check, then the same step) = "
              f"{cli['peak_mib']:.0f} MiB = {cli['peak_mib'] * MIB / model_bytes:.3f} x model (wall "
              f"{cli['wall_s']:.0f} s)", flush=True)
        lapack = measure("compress_lapack", workdir, counts[-1])
        print(f"[info] peak RSS compress 1 expert, gram_svd_mib null (LAPACK's SVD for every matrix) = "
              f"{lapack['peak_mib']:.0f} MiB = {lapack['peak_mib'] * MIB / model_bytes:.3f} x model (wall "
              f"{lapack['wall_s']:.0f} s)", flush=True)
        for n in counts[1:]:
            print(f"peak RSS {n} experts / {counts[0]} experts = {peaks[n] / peaks[counts[0]]:.3f}  (modularize; "
                  "target <= 1.1)")
        at = 8 if 8 in peaks else counts[-1]
        worst = max(peaks[at], r["peak_mib"], cli["peak_mib"])
        print(f"peak RSS / model bytes = {worst * MIB / model_bytes:.3f}  (max of modularize at {at} experts, compress "
              f"and `twinmerge compress` = {worst:.0f} MiB, over one expert's float32 {model_bytes / MIB:.0f} MiB; "
              "target <= 0.5)", flush=True)
    static = {n: measure("static", workdir, n) for n in (counts if args.static or args.only_static else [])}
    for n, s in static.items():
        print(f"peak RSS static baseline (task arithmetic, 2-point scaling grid scored on validation) {n} experts "
              f"= {s['peak_mib']:.0f} MiB = {s['peak_mib'] * MIB / model_bytes:.2f} x model (wall "
              f"{s['wall_s']:.0f} s)", flush=True)
    if static:
        print(f"peak RSS {counts[-1]} experts / {counts[0]} experts = "
              f"{static[counts[-1]]['peak_mib'] / static[counts[0]]['peak_mib']:.3f}  (static baseline: one scored "
              "backbone in memory, not one per expert or grid point)", flush=True)
    print(f"total wall time = {time.perf_counter() - t0:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--counts", type=lambda text: [int(x) for x in text.split(",")], default=[2, 4, 8],
                   help="expert counts to merge (default 2,4,8)")
    p.add_argument("--workdir", type=Path, help="where the synthetic experts go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic experts")
    p.add_argument("--static", action="store_true",
                   help="also measure a static baseline's build (grid merges scored on validation)")
    p.add_argument("--only-static", action="store_true", help="measure only the static baseline's build")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.workdir, args.n)
    workdir = Path(tempfile.mkdtemp(prefix="twinmerge-memory-", dir=args.workdir))
    try:
        run(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
