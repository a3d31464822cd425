"""A bad-input matrix across the CLI: every row is one way to get a command wrong.

Each row must give ONE line on stderr starting with "sparse-expansion: error:", a non-zero exit code, no
Python exception out of `main`, and lose nothing: no output or temporary sibling is created and every file
that existed before (the row's own inputs and the shared tiny models) is unchanged.

Rows are `Row(id, argv, match)`: `argv(c)` builds the command line from a `Ctx` (tmp directory, tiny model
and corpus, and helpers that make broken copies of them); `match` is a fragment the error line must hold.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from sparse_expansion.cli import main

SMALL = ["--calib-samples", "4", "--seqlen", "32", "--eval-samples", "2", "--quiet"]
PREFIX = "sparse-expansion: error:"


# ---------------------------------------------------------------------------------------------------------------
# fixtures: one pruned and one expanded directory, built once through the CLI


@pytest.fixture(scope="module")
def saved_dirs(llama_dir, corpus_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input-saved")
    common = ["--model", str(llama_dir), "--data", str(corpus_dir), "--sparsity", "0.5", *SMALL]
    assert main(["prune", *common, "--format", "compressed", "--out", str(root / "pruned")]) == 0
    assert main(["expand", *common, "--experts", "2", "--pca-reduction", "8", "--out", str(root / "expanded")]) == 0
    return {"pruned": root / "pruned", "expanded": root / "expanded"}


def snapshot(*roots: Path) -> dict[str, str]:
    """Every path under `roots` with a digest of its content ("dir" for directories)."""
    state = {}
    for root in roots:
        for path in sorted([root, *root.rglob("*")]):
            state[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


@dataclass
class Ctx:
    tmp: Path
    llama: Path
    corpus: Path
    factory: Callable
    saved: dict

    @property
    def out(self) -> str:
        return str(self.tmp / "out")

    def file(self, name: str, content: bytes | str = b"") -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    def dir(self, name: str, files: dict[str, bytes | str] | None = None) -> str:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        for file, content in (files or {}).items():
            self.file(f"{name}/{file}", content)
        return str(path)

    def copy(self, which: str, name: str | None = None) -> Path:
        """A private copy of the tiny model ("llama") or of a saved directory ("pruned", "expanded")."""
        source = self.llama if which == "llama" else self.saved[which]
        return Path(shutil.copytree(source, self.tmp / (name or f"{which}-copy")))

    def existing_out(self) -> str:
        """--out that already holds a file (must survive)."""
        self.dir("out", {"precious.txt": "keep me"})
        return self.out

    # command-line prefixes
    def prune(self, *extra, model=None, data=None):
        return ["prune", "--model", str(model or self.llama), "--data", str(data or self.corpus), "--sparsity", "0.5",
                "--out", self.out, *SMALL, *extra]

    def expand(self, *extra):
        return ["expand", "--model", str(self.llama), "--data", str(self.corpus), "--sparsity", "0.5", "--experts",
                "2", "--pca-reduction", "8", "--out", self.out, *SMALL, *extra]

    def eval(self, *extra, model=None, data=None):
        return ["eval", "--model", str(model or self.llama), "--data", str(data or self.corpus), *SMALL, *extra]

    def generate(self, *extra, model=None, prompt="The quick"):
        return ["generate", "--model", str(model or self.llama), "--prompt", prompt, "--max-new-tokens", "2",
                "--quiet", *extra]

    def neurons(self, *extra, model=None):
        return ["neurons", "--model", str(model or self.llama), "--data", str(self.corpus), "--out", self.out,
                "--no-plots", *SMALL, *extra]

    def activations(self, *extra):
        return ["activations", "--model", str(self.llama), "--data", str(self.corpus), *SMALL, *extra]

    def compare(self, *extra):
        return ["compare", "--model", str(self.llama), "--data", str(self.corpus), "--methods", "magnitude", *SMALL,
                *extra]

    def lm_eval(self, *extra):
        return ["lm-eval", "--model", str(self.llama), "--tasks", "sparse_expansion_local_mc", "--limit", "2",
                "--quiet", *extra]

    def law(self, *extra):
        return ["law", "--out", self.out, "--quiet", *extra]

    # broken copies
    def with_config_of(self, which: str, **overrides) -> Path:
        """A copy of `which` whose config.json comes from another tiny model (same family, other sizes)."""
        path = self.copy(which)
        shutil.copy(self.factory("llama", **overrides) / "config.json", path / "config.json")
        return path

    def edited_manifest(self, which: str, edit: Callable[[dict], None]) -> Path:
        path = self.copy(which)
        manifest = json.loads((path / "manifest.json").read_text())
        edit(manifest)
        (path / "manifest.json").write_text(json.dumps(manifest))
        return path

    def damaged(self, which: str, name: str, damage: Callable[[bytes], bytes]) -> Path:
        path = self.copy(which)
        (path / name).write_bytes(damage((path / name).read_bytes()))
        return path


def flip_middle_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


def expanded_with_pruned_weights(c: Ctx) -> Path:
    """An expanded directory whose first block's weight file (checksum updated to match) is a pruned model's:
    plain linears where the manifest has routers and experts."""
    path = c.copy("expanded")
    name = "block-00000.safetensors"
    shutil.copy(c.saved["pruned"] / name, path / name)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["weights"]["sha256"][name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


@dataclass
class Row:
    id: str
    argv: Callable[[Ctx], list[str]]
    match: str


NOT_UTF8 = b"caf\xe9 \xff\xfe broken " * 200

ROWS = [
    # --- paths -------------------------------------------------------------------------------------------------
    Row("prune/model-path-is-a-file", lambda c: c.prune(model=c.file("weights.bin", b"x")),
        "expected a model directory or a .gguf file"),
    Row("eval/model-dir-without-config", lambda c: c.eval(model=c.dir("empty-model")), "no config.json"),
    Row("eval/model-missing", lambda c: c.eval(model=c.tmp / "no-such-model"), "model path not found"),
    Row("bench/model-missing", lambda c: ["bench", "--model", str(c.tmp / "no-such-model"), "--baseline",
                                          str(c.llama), "--repeats", "1"], "model path not found"),
    Row("bench/baseline-missing", lambda c: ["bench", "--model", str(c.llama), "--baseline",
                                             str(c.tmp / "no-such-model"), "--repeats", "1"], "model path not found"),
    Row("lm-eval/model-missing", lambda c: ["lm-eval", "--model", str(c.tmp / "no-such-model"), "--tasks",
                                            "sparse_expansion_local_mc", "--quiet"], "model path not found"),
    Row("neurons/expanded-missing", lambda c: c.neurons("--expanded", str(c.tmp / "no-such-dir")), "not a directory"),
    Row("prune/data-file-missing", lambda c: c.prune(data=c.tmp / "missing.txt"), "data path not found"),
    Row("prune/data-file-empty", lambda c: c.prune(data=c.file("empty.txt")), "holds no text"),
    Row("eval/data-file-whitespace-only", lambda c: c.eval(data=c.file("blank.txt", " \n\n \n")), "holds no text"),
    Row("eval/data-dir-without-txt", lambda c: c.eval(data=c.dir("no-txt", {"notes.md": "hello"})),
        "no .txt files found"),
    Row("eval/data-test-split-empty", lambda c: c.eval(data=c.dir("empty-test", {
        "train.txt": (c.corpus / "train.txt").read_text(), "test.txt": ""})), "holds no text"),
    Row("prune/out-parent-is-a-file", lambda c: _replace(c.prune(), "--out", str(Path(c.file("a-file")) / "out")),
        "is not a directory"),
    Row("prune/out-grandparent-is-a-file",
        lambda c: _replace(c.prune(), "--out", str(Path(c.file("a-file")) / "sub" / "out")), "is not a directory"),
    Row("prune/out-is-an-existing-file", lambda c: _replace(c.prune(), "--out", c.file("out", "keep me")),
        "already exists"),
    Row("expand/out-exists", lambda c: _replace(c.expand(), "--out", c.existing_out()), "already exists"),
    Row("neurons/out-exists", lambda c: _replace(c.neurons(), "--out", c.existing_out()), "already exists"),
    Row("activations/out-exists", lambda c: c.activations("--out", c.existing_out()), "already exists"),
    Row("eval/json-parent-is-a-file", lambda c: c.eval("--json", str(Path(c.file("a-file")) / "r.json")),
        "is not a directory"),
    Row("bench/json-parent-is-a-file", lambda c: ["bench", "--kernel", "--rows", "8", "--cols", "8", "--json",
                                                  str(Path(c.file("a-file")) / "r.json")], "is not a directory"),
    Row("activations/json-parent-is-a-file", lambda c: c.activations("--json", str(Path(c.file("a-file")) / "r.json")),
        "is not a directory"),
    Row("compare/json-parent-is-a-file", lambda c: c.compare("--json", str(Path(c.file("a-file")) / "r.json")),
        "is not a directory"),
    Row("lm-eval/json-parent-is-a-file", lambda c: c.lm_eval("--json", str(Path(c.file("a-file")) / "r.json")),
        "is not a directory"),
    Row("lm-eval/include-path-missing", lambda c: c.lm_eval("--include-path", str(c.tmp / "no-tasks")),
        "not a directory of lm-eval task YAML files"),
    Row("law/out-is-a-file", lambda c: _replace(c.law(), "--out", c.file("out", "keep me")), "not a directory"),
    Row("law/out-parent-is-a-file", lambda c: _replace(c.law(), "--out", str(Path(c.file("a-file")) / "study")),
        "is not a directory"),
    Row("law/out-is-something-else", lambda c: _replace(c.law(), "--out", c.existing_out()), "not a law study"),
    # --- formats -----------------------------------------------------------------------------------------------
    Row("eval/config-not-json", lambda c: c.eval(model=c.damaged("llama", "config.json", lambda b: b"{not json")),
        "could not load model directory"),
    Row("generate/pruned-config-not-json",
        lambda c: c.generate(model=c.damaged("pruned", "config.json", lambda b: b"{not json")),
        "could not load model directory"),
    Row("eval/hf-weights-truncated",
        lambda c: c.eval(model=c.damaged("llama", "model.safetensors", lambda b: b[:len(b) // 2])),
        "corrupted or truncated"),
    Row("eval/hf-weights-header-garbage",
        lambda c: c.eval(model=c.damaged("llama", "model.safetensors", lambda b: b"\xff" * 64 + b[64:])),
        "could not load model directory"),
    Row("generate/pruned-weights-altered",
        lambda c: c.generate(model=c.damaged("pruned", "model.compressed.safetensors", flip_middle_byte)),
        "corrupted or truncated"),
    Row("eval/pruned-weights-missing", lambda c: c.eval(model=_remove(c.copy("pruned"), "model.compressed.safetensors")),
        "is missing"),
    Row("eval/manifest-unknown-version",
        lambda c: c.eval(model=c.edited_manifest("pruned", lambda m: m.update(version=99))), "version 99 is not supported"),
    Row("eval/manifest-not-json", lambda c: c.eval(model=c.damaged("expanded", "manifest.json", lambda b: b[:40])),
        "not valid JSON"),
    Row("eval/manifest-without-checksums",
        lambda c: c.eval(model=c.edited_manifest("pruned", lambda m: m["weights"].update(sha256={}))),
        "lists no weight files"),
    Row("eval/manifest-unknown-layer-kind",
        lambda c: c.eval(model=c.edited_manifest("expanded", lambda m: [v.update(kind="warp-drive")
                                                                        for v in m["custom_layers"].values()])),
        "does not match the model in config.json"),
    Row("prune/gguf-garbage", lambda c: c.prune(model=c.file("model.gguf", b"GGUF" + bytes(range(256)) * 8)),
        "could not load GGUF file"),
    Row("generate/gguf-empty", lambda c: c.generate(model=c.file("empty.gguf")), "could not load GGUF file"),
    Row("eval/tokenizer-json-garbage",
        lambda c: c.eval(model=c.damaged("llama", "tokenizer.json", lambda b: b[:len(b) // 3])),
        "could not load model directory"),
    Row("prune/data-file-not-utf8", lambda c: c.prune(data=c.file("latin1.txt", NOT_UTF8)), "is not UTF-8 text"),
    Row("eval/data-dir-not-utf8", lambda c: c.eval(data=c.dir("latin1", {"a.txt": NOT_UTF8, "b.txt": "fine"})),
        "is not UTF-8 text"),
    # --- ranges ------------------------------------------------------------------------------------------------
    Row("prune/nm-3:2", lambda c: _drop(c.prune("--nm", "3:2"), "--sparsity"), "needs 0 < N < M"),
    Row("prune/nm-0:4", lambda c: _drop(c.prune("--nm", "0:4"), "--sparsity"), "needs 0 < N < M"),
    Row("expand/nm-a:b", lambda c: _drop(c.expand("--nm", "a:b"), "--sparsity"), "malformed N:M"),
    Row("prune/no-sparsity-no-nm", lambda c: _drop(c.prune(), "--sparsity"), "give --sparsity"),
    Row("expand/sparsity-1", lambda c: _replace(c.expand(), "--sparsity", "1"), "sparsity must be in [0, 1)"),
    Row("compare/sparsity-list-out-of-range", lambda c: c.compare("--sparsity", "0.5,1.2"), "sparsity must be in [0, 1)"),
    Row("compare/sparsity-list-not-numbers", lambda c: c.compare("--sparsity", "0.5,half"), "--sparsity: expects a comma-separated list"),
    Row("prune/bits-1", lambda c: c.prune("--bits", "1"), "--bits must be a bit width in [2, 8]"),
    Row("prune/bits-9", lambda c: c.prune("--bits", "9"), "--bits must be a bit width in [2, 8]"),
    Row("expand/bits-0", lambda c: c.expand("--bits", "0"), "--bits must be a bit width in [2, 8]"),
    Row("prune/seqlen-1", lambda c: _replace(c.prune(), "--seqlen", "1"), "--seqlen must be at least 2"),
    Row("eval/seqlen-negative", lambda c: _replace(c.eval(), "--seqlen", "-5"), "--seqlen must be at least 2"),
    Row("prune/calib-samples-0", lambda c: _replace(c.prune(), "--calib-samples", "0"), "--calib-samples must be at least 1"),
    Row("eval/eval-samples-0", lambda c: _replace(c.eval(), "--eval-samples", "0"), "--eval-samples must be at least 1"),
    Row("prune/batch-size-0", lambda c: c.prune("--batch-size", "0"), "--batch-size must be at least 1"),
    Row("eval/batch-size-negative", lambda c: c.eval("--batch-size", "-1"), "--batch-size must be at least 1"),
    Row("prune/blocksize-0", lambda c: c.prune("--blocksize", "0"), "--blocksize must be at least 1"),
    Row("prune/percdamp-0", lambda c: c.prune("--percdamp", "0"), "--percdamp must be positive"),
    Row("prune/dtype-unknown", lambda c: c.prune("--dtype", "float8"), "unknown --dtype"),
    Row("eval/device-unknown", lambda c: c.eval("--device", "tpu"), "unknown --device"),
    Row("generate/dtype-unknown", lambda c: c.generate("--dtype", "int3"), "unknown --dtype"),
    Row("expand/experts-negative", lambda c: _replace(c.expand(), "--experts", "-3"), "--experts must be at least 1"),
    Row("compare/experts-list-with-0", lambda c: c.compare("--methods", "sparse-expansion", "--experts", "2,0"),
        "--experts must be at least 1"),
    Row("compare/experts-not-integers", lambda c: c.compare("--methods", "sparse-expansion", "--experts", "2,many"),
        "--experts: expects a comma-separated list"),
    Row("expand/pca-reduction-0", lambda c: _replace(c.expand(), "--pca-reduction", "0"), "--pca-reduction must be at least 1"),
    Row("expand/kmeans-restarts-0", lambda c: c.expand("--kmeans-restarts", "0"), "--kmeans-restarts must be at least 1"),
    Row("expand/kmeans-iterations-0", lambda c: c.expand("--kmeans-iterations", "0"),
        "--kmeans-iterations must be at least 1"),
    Row("expand/min-cluster-tokens-0", lambda c: c.expand("--min-cluster-tokens", "0"),
        "--min-cluster-tokens must be at least 1"),
    Row("expand/selective-0", lambda c: c.expand("--selective", "0"), "--selective must be a share of rows in (0, 100]"),
    Row("expand/selective-150", lambda c: c.expand("--selective", "150"), "--selective must be a share of rows in (0, 100]"),
    Row("generate/max-new-tokens-0", lambda c: _replace(c.generate(), "--max-new-tokens", "0"),
        "--max-new-tokens must be at least 1"),
    Row("generate/prompt-empty-string", lambda c: c.generate(prompt=""), "--prompt is empty"),
    Row("generate/prompt-longer-than-context", lambda c: c.generate(prompt="fox " * 300),
        "longer than the model's context of 256 tokens"),
    Row("generate/max-new-tokens-beyond-context", lambda c: _replace(c.generate(), "--max-new-tokens", "100000"),
        "--max-new-tokens 100,000 does not fit"),
    Row("prune/seeds-of-a-data-free-method", lambda c: c.prune("--method", "magnitude", "--seeds", "2", "--eval"),
        "magnitude reads no calibration data"),
    Row("expand/router-tokens-0", lambda c: c.expand("--router-tokens", "0"), "--router-tokens must be at least 1"),
    Row("expand/seeds-without-eval", lambda c: c.expand("--seeds", "2"), "--seeds above 1 measures how far"),
    Row("expand/seeds-0", lambda c: c.expand("--seeds", "0", "--eval"), "--seeds must be at least 1"),
    Row("neurons/seeds-without-ablate", lambda c: c.neurons("--seeds", "2"), "--seeds above 1 repeats the ablation"),
    Row("activations/seeds-0", lambda c: c.activations("--seeds", "0"), "--seeds must be at least 1"),
    Row("neurons/top-percent-0", lambda c: c.neurons("--top-percent", "0"), "--top-percent must be in (0, 100]"),
    Row("neurons/top-percent-101", lambda c: c.neurons("--top-percent", "101"), "--top-percent must be in (0, 100]"),
    Row("neurons/pairs-0", lambda c: c.neurons("--pairs", "0"), "--pairs must be at least 1"),
    Row("neurons/layers-out-of-range", lambda c: c.neurons("--layers", "0,7"), "--layers 7 is out of range"),
    Row("neurons/layers-not-integers", lambda c: c.neurons("--layers", "first"), "--layers: expects a comma-separated list"),
    Row("neurons/layers-empty", lambda c: c.neurons("--layers", ","), "--layers is empty"),
    Row("neurons/ablate-sparsity-1.5", lambda c: c.neurons("--ablate", "--ablate-sparsity", "0.9,1.5"),
        "--ablate-sparsity must be in [0, 1)"),
    Row("neurons/sweep-experts-0", lambda c: c.neurons("--sweep-experts", "1,0"), "--sweep-experts must be at least 1"),
    Row("activations/ppl-increase-negative", lambda c: c.activations("--ppl-increase", "-0.01"),
        "--ppl-increase must be positive"),
    Row("activations/ppl-increase-0", lambda c: c.activations("--ppl-increase", "0"), "--ppl-increase must be positive"),
    Row("activations/max-tokens-0", lambda c: c.activations("--max-tokens", "0"), "--max-tokens must be at least 1"),
    Row("bench/rows-0", lambda c: ["bench", "--kernel", "--rows", "0", "--cols", "8"], "--rows must be at least 1"),
    Row("bench/batch-0", lambda c: ["bench", "--kernel", "--rows", "8", "--cols", "8", "--batch", "0"], "--batch must be at least 1"),
    Row("bench/sparsity-1.5", lambda c: ["bench", "--kernel", "--rows", "8", "--cols", "8", "--sparsity", "1.5"],
        "sparsity must be in [0, 1)"),
    Row("bench/activation-sparsity-1", lambda c: ["bench", "--kernel", "--rows", "8", "--cols", "8",
                                                  "--activation-sparsity", "1"], "--activation-sparsity must be in [0, 1)"),
    Row("bench/repeats-0", lambda c: ["bench", "--model", str(c.llama), "--baseline", str(c.llama), "--repeats", "0"],
        "--repeats must be at least 1"),
    Row("lm-eval/limit-0", lambda c: _replace(c.lm_eval(), "--limit", "0"), "--limit must be at least 1"),
    Row("lm-eval/batch-size-0", lambda c: c.lm_eval("--batch-size", "0"), "--batch-size must be at least 1"),
    Row("lm-eval/num-fewshot-negative", lambda c: c.lm_eval("--num-fewshot", "-1"), "--num-fewshot must be at least 0"),
    Row("law/steps-0", lambda c: c.law("--steps", "0"), "--steps must be at least 1"),
    Row("law/hidden-not-divisible-by-heads", lambda c: c.law("--hidden", "30", "--heads", "4"), "not divisible"),
    Row("law/seqlen-1", lambda c: c.law("--seqlen", "1"), "--seqlen must be at least 2"),
    Row("law/lr-0", lambda c: c.law("--lr", "0"), "--lr must be positive"),
    Row("law/valid-windows-0", lambda c: c.law("--valid-windows", "0"), "--valid-windows must be at least 1"),
    Row("law/ppl-increase-negative", lambda c: c.law("--ppl-increase", "-1"), "--ppl-increase must be positive"),
    Row("law/activation-unknown", lambda c: c.law("--activations", "relu,tanh"), "--activations must be one of relu, silu, gelu, got 'tanh'"),
    Row("law/activations-empty", lambda c: c.law("--activations", " , "), "--activations is empty"),
    Row("law/width-depth-malformed", lambda c: c.law("--width-depth", "64by16"), "--width-depth: expects HIDDENxLAYERS"),
    Row("law/width-depth-zero-layers", lambda c: c.law("--width-depth", "64x0"), "must be at least 1"),
    Row("law/sweep-steps-0", lambda c: c.law("--sweep-steps", "0"), "--sweep-steps must be at least 1"),
    Row("law/device-unknown", lambda c: c.law("--device", "tpu"), "unknown --device"),
    # --- incompatible options ----------------------------------------------------------------------------------
    Row("prune/bits-with-wanda", lambda c: c.prune("--method", "wanda", "--bits", "4"), "only supported with sparsegpt"),
    Row("prune/bits-with-magnitude", lambda c: c.prune("--method", "magnitude", "--bits", "4"),
        "only supported with sparsegpt"),
    Row("expand/bits-with-wanda-experts", lambda c: c.expand("--expert-method", "wanda", "--bits", "4"),
        "only supported with sparsegpt"),
    Row("prune/nm-and-sparsity", lambda c: c.prune("--nm", "2:4"), "either --sparsity or --nm"),
    Row("expand/nm-and-sparsity", lambda c: c.expand("--nm", "2:4"), "either --sparsity or --nm"),
    Row("bench/kernel-and-model", lambda c: ["bench", "--kernel", "--model", str(c.llama)],
        "exactly one of --kernel or --model"),
    Row("bench/baseline-without-model", lambda c: ["bench", "--kernel", "--rows", "8", "--cols", "8", "--baseline",
                                                   str(c.llama)], "--baseline needs --model"),
    Row("bench/activation-sparsity-with-model",
        lambda c: ["bench", "--model", str(c.llama), "--baseline", str(c.llama), "--activation-sparsity", "0.5"],
        "--activation-sparsity needs --kernel"),
    Row("bench/sparsity-with-model",
        lambda c: ["bench", "--model", str(c.llama), "--baseline", str(c.llama), "--sparsity", "0.5"],
        "--sparsity needs --kernel"),
    Row("neurons/expanded-is-a-dense-model", lambda c: c.neurons("--expanded", str(c.llama)),
        "not a Sparse Expansion model directory"),
    Row("neurons/expanded-is-a-pruned-model", lambda c: c.neurons("--expanded", str(c.saved["pruned"])),
        "not a Sparse Expansion model directory"),
    Row("neurons/expanded-from-another-model",
        lambda c: c.neurons("--expanded", str(c.saved["expanded"]), model=c.factory("llama", intermediate_size=96)),
        "does not match --model"),
    Row("generate/chat-without-template", lambda c: c.generate("--chat"), "no chat template"),
    # --- a saved model applied to the wrong model --------------------------------------------------------------
    Row("eval/expanded-with-config-of-narrower-model",
        lambda c: c.eval(model=c.with_config_of("expanded", hidden_size=32)), "does not match"),
    Row("generate/expanded-with-config-of-one-block",
        lambda c: c.generate(model=c.with_config_of("expanded", num_hidden_layers=1)), "tensors the model does not"),
    Row("eval/pruned-with-config-of-narrower-model",
        lambda c: c.eval(model=c.with_config_of("pruned", hidden_size=32)), "does not match"),
    Row("eval/hf-weights-with-config-of-wider-ffn",
        lambda c: c.eval(model=c.with_config_of("llama", intermediate_size=96)), "do not match config.json"),
    Row("generate/expanded-with-pruned-weights", lambda c: c.generate(model=expanded_with_pruned_weights(c)),
        "does not match manifest.json"),
    # --- argparse: unknown or malformed options are one line too -----------------------------------------------
    Row("prune/bits-not-an-integer", lambda c: c.prune("--bits", "four"), "invalid int value"),
    Row("prune/method-unknown", lambda c: c.prune("--method", "optimal-brain-surgeon"), "invalid choice"),
    Row("prune/out-missing", lambda c: _drop(c.prune(), "--out"), "--out"),
    Row("generate/prompt-missing", lambda c: ["generate", "--model", str(c.llama)], "--prompt"),
    Row("no-command", lambda c: [], "command"),
    Row("unknown-command", lambda c: ["distill"], "invalid choice"),
    Row("eval/unknown-option", lambda c: c.eval("--sparsity", "0.5"), "unrecognized arguments"),
]


def _replace(argv: list[str], option: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(option) + 1] = value
    return argv


def _drop(argv: list[str], option: str) -> list[str]:
    argv = list(argv)
    i = argv.index(option)
    del argv[i:i + 2]
    return argv


def _remove(path: Path, name: str) -> Path:
    (path / name).unlink()
    return path


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what fixtures printed
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_line_error(code, err: str, match: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(PREFIX), lines[0]
    assert match in lines[0], lines[0]
    assert code not in (0, None), f"exit code {code!r} for: {lines[0]}"


# lm-eval's rows build its task index (about 12 s per process): slow, with the other tests that pay for it.
@pytest.mark.parametrize("row", [pytest.param(row, marks=pytest.mark.slow) if row.id.startswith("lm-eval/") else row
                                 for row in ROWS], ids=[row.id for row in ROWS])
def test_bad_input(row, llama_dir, corpus_dir, model_dir_factory, saved_dirs, tmp_path, capsys):
    c = Ctx(tmp=tmp_path, llama=llama_dir, corpus=corpus_dir, factory=model_dir_factory, saved=saved_dirs)
    argv = row.argv(c)
    watched = (tmp_path, llama_dir, corpus_dir, *saved_dirs.values())
    before = snapshot(*watched)
    code, err = run_main(argv, capsys)
    assert_one_line_error(code, err, row.match)
    assert snapshot(*watched) == before, "the failed command created, changed or removed files"


def test_row_ids_are_unique():
    ids = [row.id for row in ROWS]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------------------------------------------------
# interrupted writes and a full disk: the output appears complete or not at all; an existing one survives


def _write_half_then(exc: BaseException, calls_before: int = 0):
    """A stand-in for save_compressed that writes `calls_before` files properly, then half a file and fails."""
    from sparse_expansion.io.compressed import save_compressed

    calls = []

    def save(state, path, *args, **kwargs):
        calls.append(path)
        if len(calls) <= calls_before:
            return save_compressed(state, path, *args, **kwargs)
        Path(path).write_bytes(b"\0" * 1000)
        raise exc

    return save


def _raise(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc

    return fail


FULL = OSError(errno.ENOSPC, "No space left on device")
IO_ERROR = OSError(errno.EIO, "Input/output error")


def _prune_argv(llama_dir, corpus_dir, out: Path, *extra) -> list[str]:
    return ["prune", "--model", str(llama_dir), "--data", str(corpus_dir), "--sparsity", "0.5", "--out", str(out),
            *SMALL, *extra]


def _existing(out: Path) -> None:
    out.mkdir()
    (out / "precious.txt").write_text("keep me")


# (module to patch, attribute, replacement, prune options, message; None: Ctrl-C)
SAVE_FAILURES = {
    # data-free magnitude: the whole model saved at once through a temporary directory
    "full-disk-midway": ("model_dir", "save_compressed", lambda: _write_half_then(FULL),
                         ["--method", "magnitude", "--format", "compressed"], "No space left on device"),
    "io-error-late": ("model_dir", "file_sha256", lambda: _raise(IO_ERROR),
                      ["--method", "magnitude", "--format", "compressed"], "Input/output error"),
    "interrupted": ("model_dir", "save_compressed", lambda: _write_half_then(KeyboardInterrupt()),
                    ["--method", "magnitude", "--format", "compressed"], None),
    # sparsegpt: blocks streamed into a state directory; a failure on the first block leaves nothing to resume
    "full-disk-first-block": ("block_store", "save_compressed", lambda: _write_half_then(FULL),
                              ["--method", "sparsegpt", "--format", "compressed"], "No space left on device"),
}


@pytest.mark.parametrize("existing", [False, True], ids=["new-out", "overwrite-existing"])
@pytest.mark.parametrize("case", list(SAVE_FAILURES))
def test_failed_save_leaves_no_partial_output(case, existing, llama_dir, corpus_dir, tmp_path, capsys, monkeypatch):
    """A full disk, an I/O error or Ctrl-C while saving: one line, a non-zero exit, no output and no temporary
    directory beside it, and an existing output (with --overwrite) untouched."""
    import importlib

    module, attribute, replacement, options, message = SAVE_FAILURES[case]
    out = tmp_path / "out"
    argv = _prune_argv(llama_dir, corpus_dir, out, *options)
    if existing:
        _existing(out)
        argv.append("--overwrite")
    before = snapshot(tmp_path)
    monkeypatch.setattr(importlib.import_module(f"sparse_expansion.io.{module}"), attribute, replacement())
    code, err = run_main(argv, capsys)
    if message is None:  # Ctrl-C
        assert code == 130 and err.strip() == "sparse-expansion: interrupted", err
    else:
        assert_one_line_error(code, err, message)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("saved_files", [1, 2, "dense-checkpoint"],
                         ids=["second-block", "after-last-block", "dense-checkpoint-after-last-block"])
def test_full_disk_after_some_blocks_keeps_only_the_announced_resume_state(saved_files, llama_dir, corpus_dir,
                                                                            tmp_path, capsys, monkeypatch):
    """A streamed build that fails after a block was saved keeps its state directory for --resume (and says so);
    the output itself is neither created nor touched, and nothing else is left beside it."""
    from sparse_expansion.io import block_store, model_dir

    out = tmp_path / "out"
    _existing(out)
    before = snapshot(out)
    options = ["--overwrite"]
    if saved_files == "dense-checkpoint":  # a plain Hugging Face checkpoint written whole at the end
        monkeypatch.setattr(model_dir, "file_sha256", _raise(FULL))
        options.extend(["--format", "dense"])
    else:
        monkeypatch.setattr(block_store, "save_compressed", _write_half_then(FULL, calls_before=saved_files))
    code, err = run_main(_prune_argv(llama_dir, corpus_dir, out, *options), capsys)
    assert code not in (0, None) and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith(PREFIX)]
    assert len(errors) == 1 and "No space left on device" in errors[0], err
    state = out.with_name("out.partial")
    notes = [line for line in err.splitlines() if line.strip() and not line.startswith(PREFIX)]
    assert notes == [f"sparse-expansion: state kept for --resume {state}"], err
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.partial"]
    assert not any(p.name.endswith(".tmp") for p in state.iterdir()), "half-written block left in the state"


def test_full_disk_while_writing_json(llama_dir, corpus_dir, tmp_path, capsys, monkeypatch):
    """eval --json on a full disk: one line, no JSON file and no temporary file left."""
    from sparse_expansion.io import atomic

    real_fdopen = atomic.os.fdopen

    class FullFile:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, *a, **k: FullFile(real_fdopen(fd, *a, **k)))
    before = snapshot(tmp_path)
    code, err = run_main(["eval", "--model", str(llama_dir), "--data", str(corpus_dir), *SMALL, "--json",
                          str(tmp_path / "r.json")], capsys)
    assert_one_line_error(code, err, "No space left on device")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------


def test_every_subcommand_accepts_quiet():
    from sparse_expansion.cli import COMMANDS, build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    assert set(subparsers) == set(COMMANDS)
    for name, sub in subparsers.items():
        assert "--quiet" in sub._option_string_actions, f"{name} lacks --quiet"
