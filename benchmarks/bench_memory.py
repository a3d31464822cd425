"""Peak resident memory of `prune` and `expand` streamed block by block, against the size of the model.

Each job runs the CLI in a child process of its own, which reports its peak resident set size
(VmHWM) when it exits; a child that only imports the same libraries gives the floor. Models:
- `embedded`: SmolLM2-135M-Instruct (30 blocks);
- `deep`: the same width, three times the depth (90 blocks), random weights (seed 0);
- `llama-7b`: Llama-7B-shaped blocks (hidden 4096, FFN 11008, 32 heads; --blocks of them), random weights,
  with the embedded model's tokenizer (49,152 tokens).
If the peak follows one block, `deep` peaks where `embedded` does although it is three times larger.

    python benchmarks/bench_memory.py --models embedded,deep --jobs prune,expand --out docs/bench_memory.json
    # eval of the expanded model: experts as CSR copies (what `eval` does) against dense stacks
    python benchmarks/bench_memory.py --models embedded --jobs expand,eval --out docs/bench_memory_eval.json
    python benchmarks/bench_memory.py --models llama-7b --blocks 2 --jobs expand --dtype bfloat16 \\
        --calib 16x256 --out docs/bench_memory_llama7b.json
    # streamed evaluation of the Llama-7B-shaped model expanded x16 (experts pruned by Wanda, in minutes)
    python benchmarks/bench_memory.py --models llama-7b --blocks 2 --jobs expand,eval --eval-variants streamed \\
        --expert-method wanda --calib 16x256 --eval-samples 8 --out docs/study/streamed/llama7b_x16_streamed.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_results

# The child reports its whole peak and the peak while the engine walks the blocks, both from the kernel's
# high-water mark of its own memory (VmHWM; getrusage's ru_maxrss would also count the parent's memory at
# the fork, which survives the exec). For the walk, the mark is reset when the walk starts (writing 5 to
# /proc/self/clear_refs) and read when it ends, so what comes before (tokenizing the corpus, loading the
# parts outside the blocks) is apart.
CHILD = """
import json, sys
out = sys.argv[1]
walk = {}
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
if sys.argv[2] == "--imports-only":
    import torch, transformers, sparse_expansion.cli, sparse_expansion.workflow
    from transformers.models.llama import modeling_llama
    code = 0
else:
    from sparse_expansion.calibration.engine import SequentialCalibration
    from sparse_expansion.cli import main
    original = SequentialCalibration.run
    def run(self, *args, **kwargs):
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        try:
            return original(self, *args, **kwargs)
        finally:
            walk["peak"] = max(walk.get("peak", 0), hwm())
    SequentialCalibration.run = run
    args = sys.argv[2:]
    if args[0] == "--dense-experts":  # the baseline: experts kept as the dense (k, out, in) stacks
        from sparse_expansion.layers.expert_linear import ExpertLinear
        ExpertLinear.compact = lambda self: False
        args = args[1:]
    code = main(args)
with open(out, "w") as handle:
    json.dump({"code": code, "peak_rss_bytes": hwm(), "walk_peak_rss_bytes": walk.get("peak")}, handle)
sys.exit(code)
"""


def _child(args: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        report = handle.name
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, report, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"child failed ({done.returncode}): {' '.join(args)}\n{done.stderr[-3000:]}")
    result = json.loads(Path(report).read_text())
    os.unlink(report)
    return {**result, "seconds": seconds, "stdout": done.stdout.strip().splitlines()[-2:]}


def _random_model(kind: str, directory: Path, blocks: int, dtype: str) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from sparse_expansion.models.loading import default_model_dir

    embedded = default_model_dir(quiet=True)
    tokenizer = AutoTokenizer.from_pretrained(embedded)
    if kind == "deep":
        config = AutoConfig.from_pretrained(embedded)
        config.num_hidden_layers *= 3
    else:
        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                             num_hidden_layers=blocks, vocab_size=len(tokenizer), max_position_embeddings=4096,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    path = directory / kind
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    del model
    gc.collect()
    return path


EVAL_VARIANTS = ("compact", "dense-experts", "streamed")


def _eval_rows(kind: str, expanded: Path, args) -> list[dict]:
    """Perplexity of the expanded model, whole with its experts held as CSR copies (what `eval` does) or as dense
    stacks, or streamed (one block in memory, `eval --streamed`), as `--eval-variants` lists."""
    rows = []
    for variant in args.eval_variants.split(","):
        if variant not in EVAL_VARIANTS:
            raise SystemExit(f"unknown eval variant {variant!r}: choose from {', '.join(EVAL_VARIANTS)}")
        command = ["eval", "--model", str(expanded), "--seqlen", "256", "--eval-samples", str(args.eval_samples),
                   "--dtype", args.dtype, "--quiet", *_threads(args)]
        command += ["--streamed"] if variant == "streamed" else []
        result = _child((["--dense-experts"] if variant == "dense-experts" else []) + command)
        rows.append({"model": kind, "job": f"eval ({variant})", "command": "sparse-expansion " + " ".join(command),
                     "peak_rss_bytes": result["peak_rss_bytes"], "walk_peak_rss_bytes": result["walk_peak_rss_bytes"],
                     "seconds": result["seconds"], "stdout": result["stdout"],
                     "model_file_bytes": _bytes(expanded)})
        print(f"{kind} eval, experts {variant}: peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB; "
              f"{result['stdout'][-1]}; {result['seconds']:.0f} s", flush=True)
    shutil.rmtree(expanded, ignore_errors=True)
    return rows


def _threads(args) -> list[str]:
    return ["--threads", str(args.threads)] if args.threads else []


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="embedded,deep", help="embedded, deep, llama-7b (comma-separated)")
    parser.add_argument("--jobs", default="prune,expand")
    parser.add_argument("--blocks", type=int, default=2, help="decoder blocks of the llama-7b shape")
    parser.add_argument("--calib", default="32x256", help="calibration windows x seqlen")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--dtype", default="float32", help="weights of the random models and of the run")
    parser.add_argument("--eval-samples", type=int, default=32, help="test windows of 256 tokens for job eval")
    parser.add_argument("--eval-variants", default="compact,dense-experts",
                        help=f"how job eval holds the expanded model: {', '.join(EVAL_VARIANTS)} (comma-separated)")
    parser.add_argument("--expert-method", default=None, help="how expand prunes each expert (default: SparseGPT; "
                        "wanda builds a large shape in minutes, and evaluation's memory and time do not depend on it)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of every child")
    parser.add_argument("--workdir", default=None, help="where the models and outputs go (default: a temp dir)")
    parser.add_argument("--out", default="docs/bench_memory.json")
    args = parser.parse_args()
    windows, seqlen = (int(v) for v in args.calib.split("x"))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    floor = _child(["--imports-only"])["peak_rss_bytes"]
    rows = []
    try:
        for kind in args.models.split(","):
            if kind == "embedded":
                from sparse_expansion.models.loading import default_model_dir

                model_dir = default_model_dir(quiet=True)
            else:
                model_dir = _random_model(kind, work, args.blocks, args.dtype)
            config = json.loads((model_dir / "config.json").read_text())
            blocks = config["num_hidden_layers"]
            for job in args.jobs.split(","):
                if job == "eval":
                    rows.extend(_eval_rows(kind, work / f"{kind}-expand", args))
                    continue
                out = work / f"{kind}-{job}"
                common = ["--model", str(model_dir), "--calib-samples", str(windows), "--seqlen", str(seqlen),
                          "--sparsity", str(args.sparsity), "--dtype", args.dtype, "--quiet", "--out", str(out)]
                command = (["prune", "--method", "sparsegpt", *common] if job == "prune" else
                           ["expand", "--experts", str(args.experts), *common])
                command += _threads(args)
                if job == "expand" and args.expert_method:
                    command += ["--expert-method", args.expert_method]
                result = _child(command)
                manifest = json.loads((out / "manifest.json").read_text())
                row = {"model": kind, "job": job, "blocks": blocks, "hidden": config["hidden_size"],
                       "ffn": config["intermediate_size"], "calib": args.calib, "dtype": args.dtype,
                       "experts": args.experts if job == "expand" else None, "sparsity": args.sparsity,
                       "command": "sparse-expansion " + " ".join(command),
                       "peak_rss_bytes": result["peak_rss_bytes"], "imports_rss_bytes": floor,
                       "walk_peak_rss_bytes": result["walk_peak_rss_bytes"],
                       "above_imports_bytes": result["peak_rss_bytes"] - floor, "seconds": result["seconds"],
                       "input_model_bytes": _bytes(model_dir),
                       "output_in_memory_bytes": manifest["weights"]["dense_bytes"],
                       "output_file_bytes": manifest["weights"]["bytes"]}
                block_files = sorted(out.glob("block-*.safetensors"))
                row["output_block_bytes_in_memory"] = manifest["weights"]["dense_bytes"] // max(1, len(block_files))
                rows.append(row)
                print(f"{kind} {job}: peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB "
                      f"({row['above_imports_bytes'] / 2**30:.2f} "
                      f"above the imports), while walking the blocks {row['walk_peak_rss_bytes'] / 2**30:.2f} GiB; "
                      f"input model {row['input_model_bytes'] / 2**30:.2f} GiB, output in memory "
                      f"would be {row['output_in_memory_bytes'] / 2**30:.2f} GiB; {row['seconds']:.0f} s", flush=True)
                if not (job == "expand" and "eval" in args.jobs.split(",")):
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    write_results(args.out, rows, imports_rss_bytes=floor)


if __name__ == "__main__":
    main()
