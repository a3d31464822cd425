"""Command-line interface: `sparse-expansion {prune,expand,generate,eval,lm-eval,compare,bench,neurons,activations,law}`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys

from .errors import UsageError


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and data (shared by every command that reads data)")
    group.add_argument("--model", default=None,
                       help="local HF directory, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)")
    group.add_argument("--data", default=None,
                       help="embedded (default), a .txt file or directory, wikitext2 or c4 (online)")
    group.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    group.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    group.add_argument("--eval-samples", type=int, default=None, help="limit the number of test windows")
    group.add_argument("--seed", type=int, default=0, help="seed for the calibration windows (default 0)")
    group.add_argument("--device", default="cpu", help="compute device: cpu (default) or cuda")
    group.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    group.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    group.add_argument("--bos", choices=("auto", "always", "never"), default="auto",
                       help="start every calibration and test window with the BOS token: auto (default: when the "
                            "tokenizer adds one on encoding, e.g. Gemma), always, or never (the SparseGPT/Wanda "
                            "protocol: windows cut from one token stream)")
    group.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_pruning_options(parser: argparse.ArgumentParser, multi_sparsity: bool = False) -> None:
    group = parser.add_argument_group("pruning")
    if multi_sparsity:
        group.add_argument("--sparsity", default="0.5", help="sparsity in [0, 1), or several: 0.5,0.7")
    else:
        group.add_argument("--sparsity", type=float, default=None, help="fraction of weights to zero, in [0, 1)")
    group.add_argument("--nm", default=None, help="N:M pattern instead of --sparsity, e.g. 2:4 (2 of every 4 zeroed)")
    group.add_argument("--bits", type=int, default=None, help="quantize jointly to B bits (sparsegpt only, 2..8)")
    group.add_argument("--scope", choices=("ffn", "all"), default="ffn",
                       help="ffn: FFN linears only (default, as in Sparse Expansion); all: every linear in the blocks")
    group.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block size (default 128)")
    group.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT dampening, fraction of mean diag(H)")


def _method_names() -> list[str]:
    from .pruning.methods import METHODS

    return list(METHODS)


def _data_methods() -> list[str]:
    from .pruning.methods import METHODS

    return [name for name, method in METHODS.items() if method.statistic is not None]


def _kmeans_inits() -> tuple[str, ...]:
    from .expansion.fitting import INITS

    return INITS


def _add_expansion_options(parser: argparse.ArgumentParser, multi_experts: bool = False) -> None:
    group = parser.add_argument_group("sparse expansion")
    if multi_experts:
        group.add_argument("--experts", default="16", help="experts per FFN linear; several for compare: 1,4,16")
    else:
        group.add_argument("--experts", type=int, default=16, help="experts per FFN linear (default 16)")
    group.add_argument("--pca-reduction", type=int, default=32,
                       help="route in d_in // R PCA dimensions (default 32)")
    group.add_argument("--no-pca", action="store_true", help="cluster the raw inputs instead of their PCA projection")
    group.add_argument("--kmeans-restarts", type=int, default=1,
                       help="k-means++ restarts, lowest inertia kept (default 1, as scikit-learn)")
    group.add_argument("--kmeans-iterations", type=int, default=300,
                       help="Lloyd iterations at most, per restart (default 300)")
    group.add_argument("--kmeans-init", choices=_kmeans_inits(), default="k-means++",
                       help="k-means seeding (default k-means++)")
    group.add_argument("--router-backend", choices=("torch", "sklearn"), default="torch",
                       help="library that fits PCA and k-means (default torch; see docs/BENCHMARKS.md)")
    group.add_argument("--min-cluster-tokens", type=int, default=32,
                       help="clusters with fewer calibration tokens use the layer's whole statistic (default 32)")
    group.add_argument("--expert-method", choices=_data_methods(), default="sparsegpt",
                       help="how each expert is pruned on its cluster (default sparsegpt)")
    group.add_argument("--selective", type=float, default=None, metavar="P",
                       help="expand only the P%% of each FFN linear's rows that score highest (0 < P <= 100); "
                            "the other rows are pruned once and shared (default: expand every row)")


def _add_resume_option(parser: argparse.ArgumentParser, where: str) -> None:
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help=f"continue an interrupted run from its state directory ({where}); the result is the "
                             "one an uninterrupted run gives")


def _add_offload_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--offload-dir", default=None, metavar="DIR",
                        help="keep the calibration activations in files under DIR instead of memory (for models "
                             "whose activations do not fit)")


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--eval", action="store_true", help="also measure perplexity and record it in the manifest")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--format", choices=("auto", "compressed", "dense"), default="auto",
                        help="weights: compressed sparse tensors (auto: when smaller) or a dense checkpoint "
                             "that any Hugging Face tool reads (prune only)")


def _add_kernel_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernels", choices=("auto", "always", "off"), default="auto",
                        help="auto (default): pruned fp32 layers on the CPU use the sparse kernels wherever they "
                             "measured faster than dense; always: sparse kernels at every size; off: dense only")


def build_parser() -> argparse.ArgumentParser:
    class OneLineErrors(argparse.ArgumentParser):
        """A malformed command line is one line on stderr, like every other error (the usage is in --help)."""

        def error(self, message):
            command = self.prog.removeprefix("sparse-expansion").strip()
            self.exit(2, f"sparse-expansion: error: {command + ': ' if command else ''}{message} "
                         f"(see {self.prog} --help)\n")

    parser = OneLineErrors(prog="sparse-expansion",
                           description="One-shot pruning and Sparse Expansion of causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    prune = sub.add_parser("prune", help="prune a model and save it")
    prune.add_argument("--method", choices=_method_names(), default="sparsegpt")
    _add_pruning_options(prune)
    _add_data_options(prune)
    _add_output_options(prune)
    _add_resume_option(prune, "OUT.partial, written block by block")
    _add_offload_option(prune)

    expand = sub.add_parser("expand", help="build a Sparse Expansion model (mixture of sparse FFN experts) and save it")
    _add_pruning_options(expand)
    _add_expansion_options(expand)
    _add_data_options(expand)
    _add_output_options(expand)
    _add_resume_option(expand, "OUT.partial, written block by block")
    _add_offload_option(expand)

    gen = sub.add_parser("generate", help="generate text with a dense, pruned or expanded model (KV cache on)")
    gen.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", default="float32")
    gen.add_argument("--trust-remote-code", action="store_true")
    gen.add_argument("--quiet", action="store_true", help="print only the generated text")
    _add_kernel_option(gen)

    bench = sub.add_parser("bench", help="speed: a model against a dense baseline (--model), or kernels (--kernel)")
    bench.add_argument("--kernel", action="store_true", help="dense versus sparse products on random weights")
    bench.add_argument("--model", default=None, help="model directory to measure against --baseline")
    bench.add_argument("--baseline", default=None, help="dense baseline (default: the embedded model)")
    bench.add_argument("--prompt-tokens", type=int, default=128)
    bench.add_argument("--new-tokens", type=int, default=32)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--rows", type=int, default=11008)
    bench.add_argument("--cols", type=int, default=4096)
    bench.add_argument("--sparsity", type=float, default=None, help="--kernel: weight sparsity (default 0.7)")
    bench.add_argument("--activation-sparsity", type=float, default=None,
                       help="--kernel: a thresholded down projection (--rows outputs, --cols neurons) with this "
                            "fraction of its inputs below threshold, instead of a pruned weight")
    bench.add_argument("--batch", type=int, default=128, help="tokens in the batched case (default 128)")
    bench.add_argument("--device", default="cpu",
                       help="--kernel on cuda: dense against 2:4 semi-structured fp16 products (needs a GPU)")
    bench.add_argument("--json", default=None, help="write the result as JSON")
    bench.add_argument("--quiet", action="store_true", help="no progress bars or log messages")
    _add_kernel_option(bench)

    ev = sub.add_parser("eval", help="perplexity of a model")
    _add_data_options(ev)
    ev.add_argument("--json", default=None, help="write the result as JSON")

    lm = sub.add_parser("lm-eval", help="zero-shot tasks (BoolQ, RTE, HellaSwag, ...) through lm-evaluation-harness")
    lm.add_argument("--model", default=None,
                    help="dense, pruned or expanded model directory, .gguf file or hub id (default: the embedded model)")
    lm.add_argument("--tasks", default="boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa",
                    help="comma-separated lm-eval task names (default: the SparseGPT/Wanda zero-shot suite, online); "
                         "sparse_expansion_local_mc works offline")
    lm.add_argument("--include-path", action="append", default=None,
                    help="directory of your own lm-eval task YAML files (repeatable)")
    lm.add_argument("--limit", type=int, default=None, help="at most N examples per task (quick checks only)")
    lm.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per prompt (default 0)")
    lm.add_argument("--batch-size", type=int, default=8, help="requests per forward pass (default 8)")
    lm.add_argument("--device", default="cpu")
    lm.add_argument("--dtype", default="float32")
    lm.add_argument("--trust-remote-code", action="store_true")
    lm.add_argument("--quiet", action="store_true", help="no progress bars or lm-eval log messages")
    lm.add_argument("--json", default=None, help="write the results as JSON")

    neurons = sub.add_parser("neurons", help="neuron entanglement: Wasserstein distance of every FFN neuron to a "
                                             "Gaussian, mapping difficulty, ablation, disentanglement")
    neurons.add_argument("--out", required=True, help="output directory (written atomically)")
    neurons.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    neurons.add_argument("--layers", default=None, help="block indices to analyse, e.g. 0,1,5 (default: all)")
    neurons.add_argument("--top-percent", type=float, default=3.0,
                         help="the Wasserstein neurons: this top percent of each layer by WD (default 3)")
    neurons.add_argument("--pairs", type=int, default=None,
                         help="token pairs for mapping difficulty (default: all tokens in disjoint pairs)")
    neurons.add_argument("--no-plots", action="store_true", help="JSON and CSV only")
    neurons.add_argument("--ablate", action="store_true",
                         help="perplexity with only the selected neurons sparsified (SparseGPT on their rows) or "
                              "with their negative pre-activations zeroed, for neurons chosen by WD, output mean, "
                              "output variance, weight norm and at random")
    neurons.add_argument("--ablate-sparsity", default="0.9,0.95,0.99",
                         help="sparsities of the selected rows (default 0.9,0.95,0.99)")
    neurons.add_argument("--expanded", default=None,
                         help="a saved Sparse Expansion model (built from --model): how its clusters disentangle "
                              "the neurons")
    neurons.add_argument("--sweep-experts", default="1,2,4,8,16",
                         help="with --expanded: one neuron's sparse outputs with these numbers of experts "
                              "(default 1,2,4,8,16; empty: none)")
    _add_data_options(neurons)

    act = sub.add_parser("activations", help="activation sparsity: per-layer CETT thresholds and the PPL-p%% "
                                             "activation ratio (Sparsing Law)")
    act.add_argument("--ppl-increase", type=float, default=0.01,
                     help="perplexity rise over dense that sets the CETT (default 0.01: PPL-1%%)")
    act.add_argument("--max-tokens", type=int, default=4096,
                     help="calibration tokens per layer used to find its threshold (default 4096)")
    act.add_argument("--json", default=None, help="write the result as JSON")
    act.add_argument("--baselines", action="store_true",
                     help="also sweep perplexity against activation ratio for CETT, top-k per layer, one global "
                          "threshold (FAT-epsilon) and exact zeros (a plot next to --json)")
    act.add_argument("--out", default=None,
                     help="save the model with its thresholds (eval, generate, bench and lm-eval then run it sparse)")
    act.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    act.add_argument("--format", choices=("auto", "compressed", "dense"), default="auto",
                     help="weights of the saved model (as for prune)")
    _add_data_options(act)

    law = sub.add_parser("law", help="Sparsing Law at small scale: train ReLU and SiLU models, activation ratio "
                                     "against tokens seen, the paper's fits, a width-to-depth sweep (resumable)")
    law.add_argument("--out", required=True, help="study directory (run again with the same options to resume)")
    law.add_argument("--activations", default="relu,silu", help="activations of the main runs (relu, silu, gelu)")
    law.add_argument("--hidden", type=int, default=128)
    law.add_argument("--layers", type=int, default=4)
    law.add_argument("--heads", type=int, default=4)
    law.add_argument("--vocab", type=int, default=8192, help="most frequent corpus tokens kept (default 8192)")
    law.add_argument("--seqlen", type=int, default=128)
    law.add_argument("--batch", type=int, default=16, help="windows per step")
    law.add_argument("--steps", type=int, default=600)
    law.add_argument("--checkpoint-every", type=int, default=60)
    law.add_argument("--lr", type=float, default=3e-3)
    law.add_argument("--width-depth", default="64x16,128x4,256x1",
                     help="hidden x layers of the ReLU sweep (empty: none)")
    law.add_argument("--sweep-steps", type=int, default=200)
    law.add_argument("--ppl-increase", type=float, default=0.01)
    law.add_argument("--valid-windows", type=int, default=32)
    law.add_argument("--seed", type=int, default=0)
    law.add_argument("--device", default="cpu", help="cpu (default) or cuda: scale --hidden/--layers/--steps up there")
    law.add_argument("--quiet", action="store_true")

    cmp_ = sub.add_parser("compare", help="several methods on the same calibration and test windows")
    cmp_.add_argument("--methods", default="dense,magnitude,wanda,sparsegpt",
                      help="comma-separated: " + ", ".join(["dense", *_method_names(), "sparse-expansion"]))
    _add_pruning_options(cmp_, multi_sparsity=True)
    _add_expansion_options(cmp_, multi_experts=True)
    _add_data_options(cmp_)
    cmp_.add_argument("--json", default=None, help="write {'results': [...]} to this file")
    cmp_.add_argument("--report", default=None, help="Markdown report (default: next to --json, .md)")
    _add_resume_option(cmp_, "JSON.partial with --json, written after every block and every finished row")
    _add_offload_option(cmp_)
    return parser


def _settings(args):
    from .workflow import RunSettings

    return RunSettings(model=args.model, data=args.data, calib_samples=args.calib_samples, seqlen=args.seqlen,
                       eval_samples=args.eval_samples, seed=args.seed, device=args.device, dtype=args.dtype,
                       scope=getattr(args, "scope", "ffn"), batch_size=args.batch_size, bos=args.bos, quiet=args.quiet,
                       trust_remote_code=args.trust_remote_code, offload_dir=getattr(args, "offload_dir", None))


def _options(args):
    from .pruning import PruneOptions
    from .pruning.quantization import ChannelQuantizer

    if args.bits is not None:
        ChannelQuantizer(args.bits)  # validates the range
    if args.blocksize < 1:
        raise UsageError("--blocksize must be at least 1")
    if args.percdamp <= 0:
        raise UsageError("--percdamp must be positive")
    return PruneOptions(bits=args.bits, blocksize=args.blocksize, percdamp=args.percdamp)


def _expansion(args, experts: int):
    from .expansion import ExpansionConfig

    if args.min_cluster_tokens < 1:
        raise UsageError("--min-cluster-tokens must be at least 1")
    if args.selective is not None and not 0 < args.selective <= 100:
        raise UsageError(f"--selective must be a percentage of rows in (0, 100], got {args.selective:g}")
    if args.bits is not None:
        from .pruning import get_method

        get_method(args.expert_method, args.bits)  # joint quantization needs sparsegpt experts
    config = ExpansionConfig(experts=experts, pca_reduction=None if args.no_pca else args.pca_reduction,
                             kmeans_restarts=args.kmeans_restarts, kmeans_iterations=args.kmeans_iterations,
                             kmeans_init=args.kmeans_init, seed=args.seed, backend=args.router_backend,
                             min_cluster_tokens=args.min_cluster_tokens, method=args.expert_method,
                             selective=None if args.selective is None else args.selective / 100)
    config.validate()
    return config


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UsageError(f"{option} expects integers, e.g. 1,4,16; got {text!r}") from None


def _specs(args) -> list:
    from .pruning import SparsitySpec

    if args.nm:
        if isinstance(args.sparsity, float):  # prune, expand: no default, so the user gave both
            raise UsageError(f"give either --sparsity or --nm, not both (--nm {args.nm} zeroes "
                             f"{SparsitySpec.create(nm=args.nm).sparsity:.0%} of the weights)")
        return [SparsitySpec.create(nm=args.nm)]
    values = args.sparsity if isinstance(args.sparsity, str) else (
        None if args.sparsity is None else str(args.sparsity))
    if values is None:
        return [SparsitySpec.create()]
    specs = []
    for item in values.split(","):
        try:
            specs.append(SparsitySpec.create(sparsity=float(item)))
        except ValueError:
            raise UsageError(f"--sparsity expects numbers, got {item!r}") from None
    return specs


def _print(text: str, quiet: bool = False) -> None:
    if not quiet:
        print(text, flush=True)


def _fingerprint(args) -> dict:
    """What a resumed run must share with the interrupted one: every option but where and how it reports."""
    volatile = {"out", "resume", "overwrite", "quiet", "eval", "json", "report", "offload_dir"}
    return {k: v for k, v in sorted(vars(args).items()) if k not in volatile}


def _build_streamed(args, command: str, report, job, extra_of=None):
    """Open (or resume) the run's state directory, build block by block into it, then make it `--out`.
    Returns (session, manifest). `job(session, model, engine_options, report)` runs the engine."""
    from . import distributed, workflow
    from .io import save_model_dir
    from .io.block_store import default_state_dir
    from .io.model_dir import update_manifest
    from .models import load_model
    from .workflow import streamed

    keep = command == "prune" and args.format == "dense"  # a plain HF checkpoint is written whole at the end
    store = streamed.open_store(args.resume or default_state_dir(args.out), _fingerprint(args), bool(args.resume))
    try:
        session = workflow.open_session(_settings(args), stream=not keep)
        if store.done and not args.quiet:
            print(f"resuming after block {store.done - 1} of {store.path}", file=sys.stderr)
        streamed.build_streamed(session, store, lambda model, options, rep: job(session, model, options, rep),
                                report, args.format, keep_model=keep)
        extra = extra_of(session, store) if extra_of is not None else {}
        data = workflow.manifest(session, command, report, _options(args), extra)
        if keep:
            _on_main(save_model_dir, session.model, session.tokenizer, args.out, data, weight_format=args.format,
                     overwrite=args.overwrite)
            _on_main(store.discard)
        else:
            streamed.finish_streamed(session, store, args.out, data)
    except BaseException:
        if distributed.is_main() and store.path.exists():
            if store.done == 0:
                store.discard()  # nothing worth resuming
            else:
                print(f"sparse-expansion: state kept for --resume {store.path}", file=sys.stderr)
        raise
    if args.eval:
        built = load_model(args.out, dtype=args.dtype, trust_remote_code=args.trust_remote_code, quiet=True,
                           compact=args.device == "cpu").model
        data["perplexity"] = workflow.evaluate(session, built)
        _on_main(update_manifest, args.out, {"perplexity": data["perplexity"]})
    return session, data


def cmd_prune(args) -> int:
    from . import workflow
    from .io import check_output_path, save_model_dir
    from .pruning import PruneReport, get_method

    spec = _specs(args)[0]
    options = _options(args)
    method = get_method(args.method, options.bits)
    check_output_path(args.out, args.overwrite)
    if method.statistic is None:
        # Data-free (magnitude): seconds for any model, no calibration walk to stream or resume.
        if args.resume:
            raise UsageError(f"--resume: {args.method} uses no calibration data and is not resumable; run it again")
        session = workflow.open_session(_settings(args))
        report = workflow.prune_session_model(session, session.model, args.method, spec, options)
        data = workflow.manifest(session, "prune", report, options)
        if args.eval:
            data["perplexity"] = workflow.evaluate(session, session.model)
        _on_main(save_model_dir, session.model, session.tokenizer, args.out, data, weight_format=args.format,
                 overwrite=args.overwrite)
    else:
        report = PruneReport(method=method.name, spec=spec, scope=args.scope)

        def job(session, model, engine_options, rep):
            return workflow.prune_session_model(session, model, args.method, spec, options, engine_options, rep)

        session, data = _build_streamed(args, "prune", report, job)
    print(f"{args.method} {spec.label}: measured sparsity {report.overall_sparsity():.4f} over "
          f"{len(report.layers)} layers in {report.seconds:.1f} s -> {args.out}")
    if args.eval:
        print(f"perplexity {data['perplexity']['ppl']:.3f} on {data['perplexity']['eval_tokens']} tokens")
    return 0


def cmd_expand(args) -> int:
    from . import workflow
    from .expansion import ExpansionReport
    from .io import check_output_path
    from .workflow import streamed

    spec = _specs(args)[0]
    options = _options(args)
    config = _expansion(args, args.experts)
    check_output_path(args.out, args.overwrite)
    report = ExpansionReport(spec=spec, config=config)

    def job(session, model, engine_options, rep):
        return workflow.expand_session_model(session, model, spec, options, config, engine_options, report=rep)

    def extra_of(session, store):
        return {"costs": streamed.streamed_costs(session, store)}

    _, data = _build_streamed(args, "expand", report, job, extra_of)
    print(f"sparse expansion x{config.experts} at {spec.label}: {report.overall_sparsity():.4f} sparsity per expert, "
          f"{report.fallbacks()} fallback experts, {report.seconds:.1f} s -> {args.out}")
    costs = data["costs"]
    print(f"FFN FLOPs/token {costs['ffn_flops_per_token'] / 1e6:.1f} M (dense "
          f"{costs['ffn_dense_flops_per_token'] / 1e6:.1f} M, router {costs['router_flops_per_token'] / 1e6:.2f} M); "
          f"stored {costs['stored_bytes'] / 2**20:.0f} MiB")
    if args.eval:
        print(f"perplexity {data['perplexity']['ppl']:.3f} on {data['perplexity']['eval_tokens']} tokens")
    return 0


def cmd_generate(args) -> int:
    import torch

    from .models import load_model

    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if not args.prompt.strip() and not args.chat:
        raise UsageError("--prompt is empty: give some text to continue")
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                        quiet=True, compact=True)
    tokenizer = loaded.tokenizer
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("--chat: this tokenizer has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    ids = ids.to(args.device)
    from .inference import accelerate

    accelerate(loaded.model, args.kernels)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                    do_sample=False, use_cache=True, pad_token_id=pad)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(text if args.quiet else f"{args.prompt}{text}")
    return 0


def cmd_bench(args) -> int:
    from .bench.kernel import kernel_benchmark
    from .io import atomic_write_text, check_output_path

    if args.kernel == bool(args.model):
        raise UsageError("bench needs exactly one of --kernel or --model DIR")
    if args.kernel:
        if args.baseline is not None:
            raise UsageError("--baseline needs --model DIR (it is the model's dense reference)")
        if args.activation_sparsity is not None and args.sparsity is not None:
            raise UsageError("give either --sparsity (a pruned weight) or --activation-sparsity, not both")
        if args.device != "cpu" and args.activation_sparsity is not None:
            raise UsageError("--activation-sparsity measures the CPU kernel; drop --device")
        if args.device != "cpu" and args.sparsity is not None:
            raise UsageError(f"--device {args.device} measures 2:4 (50%) semi-structured products; drop --sparsity")
    else:
        for option, value in (("--activation-sparsity", args.activation_sparsity), ("--sparsity", args.sparsity)):
            if value is not None:
                raise UsageError(f"{option} needs --kernel (a --model is measured as it was saved)")
        if args.device != "cpu":
            raise UsageError("--device applies to --kernel; bench --model runs on the CPU")
    if args.sparsity is None:
        args.sparsity = 0.7
    if args.json:
        check_output_path(args.json, overwrite=True)
    if args.model:
        from .bench.model import model_benchmark

        result = model_benchmark(args.model, args.baseline, args.prompt_tokens, args.new_tokens, args.repeats,
                                 kernels=args.kernels)
        for name in ("baseline", "model"):
            r = result[name]
            print(f"{name}: prefill {r['prefill_tokens_per_s']:.1f} tok/s, decode {r['decode_tokens_per_s']:.1f} tok/s, "
                  f"disk {r['disk_bytes'] or 0:,} bytes, parameters {r['parameter_bytes']:,} bytes")
        print(f"speedup: prefill {result['prefill_speedup']:.2f}x, decode {result['decode_speedup']:.2f}x; "
              f"peak RSS {result['peak_rss_mb']:.0f} MB (both models)")
    elif args.activation_sparsity is not None:
        from .bench.kernel import activation_benchmark

        result = activation_benchmark(args.rows, args.cols, args.activation_sparsity, batch=args.batch)
        for label in ("single", "batched"):
            t = result[label]
            tokens = 1 if label == "single" else args.batch
            print(f"{args.rows}x{args.cols} at {args.activation_sparsity:.0%} activation sparsity, {tokens} token(s): "
                  f"dense {t['dense_ms']:.3f} ms, masked dense {t['masked_dense_ms']:.3f} ms, kernel "
                  f"{t['kernel_ms']:.3f} ms, layer {t['layer_ms']:.3f} ms, speedup {t['speedup']:.2f}x "
                  f"(memory-bound limit: dense {t['dense_limit_ms']:.3f} ms, kernel {t['kernel_limit_ms']:.3f} ms "
                  f"at {result['bandwidth_gbs']:.1f} GB/s)")
    elif args.device.startswith("cuda"):
        from .bench.kernel import semi_structured_benchmark

        result = semi_structured_benchmark(args.rows, args.cols, batch=args.batch)
        for label in ("single", "batched"):
            t = result[label]
            print(f"{args.rows}x{args.cols} 2:4 {result['dtype']} on {result['device']}, {label}: dense "
                  f"{t['dense_ms']:.4f} ms, semi-structured {t['semi_structured_ms']:.4f} ms, speedup {t['speedup']:.2f}x")
        print(f"a model's layer of this shape uses 2:4 at token counts: {result['layer_uses_semi_structured_at'] or 'never'}")
    else:
        result = kernel_benchmark(args.rows, args.cols, args.sparsity, batch=args.batch)
        for label in ("single", "batched"):
            t = result[label]
            tokens = 1 if label == "single" else args.batch
            kernel = f"kernel {t['kernel_ms']:.3f} ms, layer {t['layer_ms']:.3f} ms, " if "kernel_ms" in t else ""
            print(f"{args.rows}x{args.cols} at {args.sparsity:.0%}, {tokens} token(s): dense {t['dense_ms']:.3f} ms, "
                  f"torch CSR {t['torch_csr_ms']:.3f} ms, scipy CSR {t['scipy_csr_ms']:.3f} ms, {kernel}"
                  f"speedup {t['speedup']:.2f}x (memory-bound limit: dense {t['dense_limit_ms']:.3f} ms, "
                  f"CSR {t['csr_limit_ms']:.3f} ms at {result['bandwidth_gbs']:.1f} GB/s)")
        if not result["kernel_available"]:
            print(f"sparse kernel unavailable: {result['kernel_unavailable_reason']}")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


def cmd_eval(args) -> int:
    from . import workflow
    from .io import atomic_write_text, check_output_path

    if args.json:
        check_output_path(args.json, overwrite=True)
    session = workflow.open_session(_settings(args), compact=args.device == "cpu")
    result = workflow.evaluate(session, session.model)
    result.update({"model": session.loaded.source, "seqlen": args.seqlen,
                   "data": session.data_summary()})
    print(f"perplexity {result['ppl']:.4f} on {result['eval_tokens']} tokens ({result['eval_windows']} windows "
          f"of {args.seqlen})")
    if args.json:
        _on_main(atomic_write_text, args.json, json.dumps(result, indent=2) + "\n")
    return 0


def cmd_lm_eval(args) -> int:
    from .evaluation import zero_shot
    from .io import atomic_write_text, check_output_path
    from .models import load_model

    zero_shot.check_options(args.limit, args.batch_size, args.num_fewshot)
    if args.json:
        check_output_path(args.json, overwrite=True)
    manager = zero_shot.task_manager(args.include_path)  # unknown tasks fail before the model loads
    tasks = zero_shot.check_tasks(manager, args.tasks)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                        quiet=args.quiet)
    result = zero_shot.run_lm_eval(loaded, tasks, include_path=args.include_path, limit=args.limit,
                                   batch_size=args.batch_size, num_fewshot=args.num_fewshot, device=args.device,
                                   manager=manager, quiet=args.quiet)
    result["model"] = loaded.source
    print(zero_shot.format_results(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


def _float_list(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise UsageError(f"{option} expects numbers, e.g. 0.9,0.95; got {text!r}") from None


def cmd_neurons(args) -> int:
    from . import workflow
    from .io import check_output_path
    from .workflow.neurons import NeuronOptions, run_neurons

    options = NeuronOptions(layers=None if args.layers is None else _int_list(args.layers, "--layers"),
                            top_percent=args.top_percent, pairs=args.pairs, seed=args.seed, plots=not args.no_plots,
                            ablate=args.ablate, ablate_sparsities=_float_list(args.ablate_sparsity, "--ablate-sparsity"),
                            expanded=args.expanded, sweep_experts=tuple(_int_list(args.sweep_experts, "--sweep-experts")))
    options.validate()
    check_output_path(args.out, args.overwrite)
    session = workflow.open_session(_settings(args))
    options.blocks(len(session.layout.blocks))  # a bad --layers fails before any work
    summary = run_neurons(session, args.out, options, overwrite=args.overwrite)
    layers = summary["layers"]
    print(f"{len(layers)} FFN linear layers of {len(summary['blocks'])} blocks, {summary['calib_tokens']} calibration "
          f"tokens -> {args.out}")
    for row in layers[:3] + ([] if len(layers) <= 3 else [None]):
        if row is None:
            print("...")
            continue
        print(f"  {row['layer']}: median WD {row['wd']['median']:.4f}, max {row['wd']['max']:.4f}, "
              f"Spearman(WD, MD) {row['spearman_wd_md'] if row['spearman_wd_md'] is None else round(row['spearman_wd_md'], 3)}")
    for row in summary.get("ablation", [])[1:]:
        sparsity = "zero negative" if row["sparsity"] is None else f"{row['sparsity']:.0%}"
        print(f"  ablation {row['criterion']} {sparsity}: perplexity {row['ppl']:.3f}")
    if "disentanglement" in summary:
        d = summary["disentanglement"]["wd_wasserstein_neurons"]
        if d.get("neurons"):
            print(f"  disentanglement: weighted WD lower for {d['fraction_lower']:.1%} of the Wasserstein neurons, "
                  f"median change {d['median_relative_change']:+.1%}")
    return 0


def cmd_activations(args) -> int:
    from . import workflow
    from .activation.thresholds import check_ppl_increase
    from .io import atomic_write_text, check_output_path
    from .workflow.activations import run_activations

    check_ppl_increase(args.ppl_increase)  # before the model loads
    if args.json:
        check_output_path(args.json, overwrite=True)
    if args.out:
        check_output_path(args.out, args.overwrite)
    session = workflow.open_session(_settings(args))
    result = run_activations(session, args.ppl_increase, args.max_tokens, install=bool(args.out),
                             baselines=args.baselines)
    print(f"PPL-{args.ppl_increase:.1%} activation ratio {result['activation_ratio']:.4f} (sparsity "
          f"{result['sparsity']:.4f}) at CETT {result['cett']:.4f}: perplexity {result['sparse_ppl']:.4f} against "
          f"dense {result['dense_ppl']:.4f} ({result['ppl_ratio']:.4f}x) on {result['eval_tokens']} tokens")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        if result["curves"]:
            from .activation.plots import curves_figure

            figure = os.path.splitext(args.json)[0] + ".png"
            curves_figure(result["curves"], result["dense_ppl"], figure, session.loaded.source.split(" (")[0])
            print(f"curves: {figure}")
    if args.out:
        from .io import save_model_dir

        record = {k: v for k, v in result.items() if k not in ("model", "settings", "data")}
        save_model_dir(session.model, session.tokenizer, args.out,
                       workflow.manifest(session, "activations", extra={"activation_sparsity": record}),
                       weight_format=args.format, overwrite=args.overwrite)
        print(f"model with thresholds -> {args.out}")
    return 0


def cmd_law(args) -> int:
    from .training.trainer import TrainConfig
    from .workflow.law import run_law

    pairs = []
    for item in (i.strip() for i in args.width_depth.split(",")):
        if not item:
            continue
        try:
            hidden, layers = (int(v) for v in item.split("x"))
        except ValueError:
            raise UsageError(f"--width-depth expects HIDDENxLAYERS items, e.g. 64x16; got {item!r}") from None
        if hidden < 1 or layers < 1:
            raise UsageError(f"--width-depth {item!r}: hidden size and layers must be at least 1")
        pairs.append((hidden, layers))
    base = TrainConfig(hidden=args.hidden, layers=args.layers, heads=args.heads, vocab=args.vocab,
                       seqlen=args.seqlen, batch=args.batch, steps=args.steps, checkpoint_every=args.checkpoint_every,
                       lr=args.lr, seed=args.seed)
    activations = [a.strip() for a in args.activations.split(",") if a.strip()]
    if not activations:
        raise UsageError("--activations is empty")
    result = run_law(args.out, base, activations, pairs, args.sweep_steps, args.ppl_increase, args.valid_windows,
                     progress=not args.quiet, device=args.device)
    for name, run in result["runs"].items():
        rows = run["checkpoints"]
        fit = run["fit"]
        print(f"{name}: activation ratio {rows[0]['activation_ratio']:.4f} at {rows[0]['tokens']:,} tokens -> "
              f"{rows[-1]['activation_ratio']:.4f} at {rows[-1]['tokens']:,} (CETT {run['cett']:.4f}); fit: "
              + (fit["error"] if "error" in fit else f"A0 {fit['A0']:.4f}, alpha {fit['alpha']:.3g}, rmse {fit['rmse']:.4f}"))
    for row in result["width_depth"]:
        print(f"{row['run']}: width/depth {row['width_depth_ratio']:.1f}, activation ratio {row['activation_ratio']:.4f}")
    print(f"-> {args.out}/law.json, law.png")
    return 0


def cmd_compare(args) -> int:
    from . import workflow
    from .io import atomic_write_text, check_output_path

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise UsageError("--methods is empty")
    specs = _specs(args)
    options = _options(args)
    experts = _int_list(args.experts, "--experts")
    expansion = _expansion(args, experts[0] if experts else 16)
    report_path = args.report or (os.path.splitext(args.json)[0] + ".md" if args.json else None)
    for path in (args.json, report_path):
        if path:
            check_output_path(path, overwrite=True)
    state = None
    if args.resume or args.json:
        from .io.block_store import default_state_dir
        from .workflow.compare import CompareState

        state = CompareState(args.resume or default_state_dir(args.json), _fingerprint(args), bool(args.resume))
    try:
        session = workflow.open_session(_settings(args))
        rows = workflow.compare(session, methods, specs, options, experts=experts, expansion=expansion, state=state)
    except BaseException:
        if state is not None and not state.has_progress():
            state.discard()  # nothing worth resuming
        elif state is not None:
            print(f"sparse-expansion: state kept for --resume {state.path}", file=sys.stderr)
        raise
    table = workflow.format_table(rows)
    print(table)
    command_line = "sparse-expansion " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.json:
        payload = {"settings": session.settings.describe(), "model": session.loaded.source,
                   "data": session.data_summary(), "results": rows}
        _on_main(atomic_write_text, args.json, json.dumps(payload, indent=2) + "\n")
    if report_path:
        _on_main(atomic_write_text, report_path, workflow.markdown_report(session, rows, command_line))
    if state is not None:
        state.discard()
        print(f"report: {report_path}" + (f"; json: {args.json}" if args.json else ""))
    return 0


COMMANDS = {"prune": cmd_prune, "expand": cmd_expand, "generate": cmd_generate, "eval": cmd_eval,
            "lm-eval": cmd_lm_eval, "compare": cmd_compare, "bench": cmd_bench,
            "neurons": cmd_neurons, "activations": cmd_activations, "law": cmd_law}


# Commands that run data-parallel under torchrun (each rank a share of the windows, rank 0 writes).
DISTRIBUTED_COMMANDS = ("prune", "expand", "eval", "compare")


def _join_ranks(args, argv: list[str] | None) -> None:
    """Under torchrun: join the process group, check that every rank got the same command, keep the other
    ranks quiet (rank 0 prints and writes)."""
    from . import distributed

    if not distributed.launched():
        return
    if args.command not in DISTRIBUTED_COMMANDS:
        raise UsageError(f"{args.command} does not run under torchrun; run it as one process (distributed: "
                         f"{', '.join(DISTRIBUTED_COMMANDS)})")
    args.device = distributed.init_from_env(args.device)
    distributed.check_same(list(sys.argv[1:] if argv is None else argv), "arguments")
    if not distributed.is_main():
        args.quiet = True
        sys.stdout = open(os.devnull, "w")


def _on_main(write, *args, **kwargs):
    """Run a write on rank 0 only (every rank in one process), then let the ranks meet."""
    from . import distributed

    result = write(*args, **kwargs) if distributed.is_main() else None
    distributed.barrier()
    return result


def main(argv: list[str] | None = None) -> int:
    from . import distributed

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        _join_ranks(args, argv)
    except UsageError as exc:
        print(f"sparse-expansion: error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "quiet", False):
        os.environ.setdefault("TQDM_DISABLE", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        where = "" if distributed.is_main() else f" (rank {distributed.rank()})"
        print(f"sparse-expansion: error{where}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the system, not the input: a full disk, a read-only or vanished path, permissions
        where = "" if distributed.is_main() else f" (rank {distributed.rank()})"
        reason = exc.strerror or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"sparse-expansion: error{where}: {exc.filename}: {reason}" if exc.filename else
              f"sparse-expansion: error{where}: {reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sparse-expansion: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
