"""The `neurons` job: the entanglement analysis of a dense model, its sparsification ablation, and the
disentanglement by a saved Sparse Expansion model. Everything goes to one output directory, written
atomically (a failed or interrupted run leaves nothing behind)."""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..analysis import ablation, disentangle, plots, records
from ..analysis.neurons import analyze_neurons, layer_outputs, walk_ffn_inputs
from ..analysis.wasserstein import wasserstein_to_gaussian
from ..errors import literal
from ..evaluation import spread
from ..expansion import ExpansionConfig, expand_linear
from ..expansion.fitting import EXPERTS
from ..io import atomic_output_dir, atomic_write_text
from ..io.model_dir import read_manifest
from ..layers.protocol import kind_of, linear_shape
from ..models import discover, load_model
from ..pruning import PruneOptions, PruneReport, SparsitySpec, get_method, prune_model
from ..runtime import release_memory
from ..settings import AtLeast, Each, Interval, OneOf, SettingError, check_fields, floats, ints, not_empty, setting
from .jobs import check_plain_blocks, evaluate
from .report import environment
from .session import Session
from .streamed import build_and_evaluate_streamed

ABLATION_SPARSITIES = (0.9, 0.95, 0.99)
SWEEP_EXPERTS = (1, 2, 4, 8, 16)


@dataclass
class NeuronOptions:
    """The neurons job (checked on construction; `load_expanded` reads the --expanded manifest)."""

    layers: tuple[int, ...] | None = setting(None, "block indices to analyse, e.g. 0,1,5 (default: all)",
                                             parse=ints, check=not_empty)
    top_percent: float = setting(3.0, "the Wasserstein neurons: this top percent of each layer by WD",
                                 Interval(0, 100))
    pairs: int | None = setting(None, "token pairs for mapping difficulty (default: all tokens in disjoint pairs)",
                                AtLeast(1))
    seed: int = setting(0, "seed of the pairs and the random ablation (the CLI uses the calibration seed)", cli=False)
    plots: bool = setting(True, "write the figures", off_flag=("--no-plots", "JSON and CSV only"))
    ablate: bool = setting(False, "perplexity with only the selected neurons sparsified (SparseGPT on their rows) "
                                  "or with their negative pre-activations zeroed, for neurons chosen by WD, output "
                                  "mean, output variance, weight norm and at random")
    ablate_sparsities: tuple[float, ...] = setting(ABLATION_SPARSITIES, "sparsities of the selected rows",
                                                   Each(Interval(0, 1, closed_low=True, open_high=True)),
                                                   parse=floats, flag="--ablate-sparsity")
    criteria: tuple[str, ...] = setting(ablation.CRITERIA, "neuron choices of the ablation",
                                        Each(OneOf(ablation.CRITERIA)), cli=False)
    expanded: str | None = setting(None, "a saved Sparse Expansion model (built from --model): how its clusters "
                                         "disentangle the neurons")
    sweep_experts: tuple[int, ...] = setting(SWEEP_EXPERTS, "with --expanded: one neuron's sparse outputs with these "
                                                            "numbers of experts (empty: none)",
                                             Each(EXPERTS), parse=ints)
    _manifest: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        check_fields(self)

    def load_expanded(self) -> None:
        """Read (and check) the --expanded model's manifest before any work."""
        if self.expanded is not None and self._manifest is None:
            self._manifest = expanded_manifest(self.expanded)

    def blocks(self, count: int) -> list[int]:
        if self.layers is None:
            return list(range(count))
        bad = [i for i in self.layers if not 0 <= i < count]
        if bad:
            raise SettingError("layers", f"{{layers}} {bad[0]} is out of range: the model has {count} blocks "
                                         f"(0..{count - 1})")
        return sorted(set(self.layers))


def check_seeds(options: NeuronOptions, seeds: list[int]) -> None:
    if len(seeds) > 1 and not options.ablate:
        raise SettingError("seeds", "{seeds} above 1 repeats the ablation over calibration draws: it needs {ablate}")


def expanded_manifest(path: str) -> dict:
    directory = Path(path)
    if not directory.is_dir():
        raise SettingError("expanded", f"{{expanded}} {literal(path)}: not a directory")
    manifest = read_manifest(directory)
    if manifest is None or manifest.get("method") != "sparse-expansion":
        raise SettingError("expanded", f"{{expanded}} {literal(path)}: not a Sparse Expansion model directory "
                                       "(written by `expand`)")
    return manifest


def check_expanded_matches(model, path: str, manifest: dict) -> None:
    """Every expert layer of the expanded model replaces a linear of `model` with the same shape (before any work:
    an expanded model built from another model is refused)."""
    for name, spec in manifest.get("custom_layers", {}).items():
        if "in_features" not in spec or "out_features" not in spec:
            continue  # routers and other layers without a linear's shape
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise SettingError("expanded", f"{{expanded}} {literal(path)} was built from another model: {{model}} has "
                                           f"no layer {literal(name)}") from None
        shape = tuple(linear_shape(module)) if kind_of(module) is not None else None
        if shape is not None and shape != (spec["out_features"], spec["in_features"]):
            raise SettingError("expanded", f"{{expanded}} {literal(path)} does not match {{model}}: {literal(name)} "
                                           f"is {spec['out_features']}x{spec['in_features']} there, "
                                           f"{shape[0]}x{shape[1]} here (built from another model?)")


def run_neurons(session: Session, out: str, options: NeuronOptions, overwrite: bool = False,
                seeds: list[int] | None = None) -> dict:
    """Measure, write and (optionally) ablate and compare with an expanded model; returns the summary. With more
    than one of `seeds` (the first is the session's), the ablation is repeated on each further calibration draw:
    the neurons measured anew there, chosen by each criterion and ablated, against the same test windows."""
    options.load_expanded()
    check_plain_blocks(session, "neurons")
    seeds = seeds or [session.settings.seed]
    check_seeds(options, seeds)
    blocks = options.blocks(len(session.layout.blocks))
    if options.expanded:
        if session.loaded.streamed is not None:
            raise SettingError("expanded", "{expanded} is loaded whole and compared layer by layer with the model "
                                           "held whole: evaluate without streaming to use it")
        check_expanded_matches(session.model, options.expanded, options._manifest)
    windows = session.calibration()
    s = session.settings
    with atomic_output_dir(out, overwrite) as tmp:
        layer_dir = tmp / "layers"
        layer_dir.mkdir()
        measured, rows = [], []

        def on_layer(layer) -> None:
            rows.append(records.write_layer(layer_dir, layer))
            if options.plots:
                plots.layer_figure(layer, layer_dir / f"{records.layer_stem(layer)}.png")
            layer.examples = {}  # the sample outputs are only for the figure
            measured.append(layer)
            release_memory()

        analyze_neurons(session.model, session.layout, windows, blocks, on_layer, options.top_percent, options.pairs,
                        options.seed, s.device, s.batch_size, progress=not s.quiet, streamed=session.loaded.streamed)
        summary = {"model": session.loaded.source, "settings": session.settings.describe(),
                   "data": session.data_summary(), "blocks": blocks, "top_percent": options.top_percent,
                   "calib_tokens": int(windows.numel()), "layers": [_short(r) for r in rows],
                   "streamed": session.loaded.streamed is not None,
                   "environment": environment(session)}  # what moves its rounding (threads, CPU, dtype)
        if options.plots:
            plots.summary_figure(rows, tmp / "summary.png")
        if options.ablate:
            summary["ablation"] = run_ablation(session, measured, options, tmp)
            if len(seeds) > 1:
                summary["ablation_over_seeds"] = ablation_over_seeds(session, blocks, options, seeds,
                                                                     summary["ablation"], tmp)
        if options.expanded:
            summary["disentanglement"] = run_disentanglement(session, blocks, options, tmp)
        records.write_json(tmp / "summary.json", summary)
    return summary


def _short(row: dict) -> dict:
    keep = ("layer", "block", "name", "role", "neurons", "tokens", "wd", "md", "spearman_wd_md", "undefined_neurons")
    return {k: row[k] for k in keep}


# -- ablation ----------------------------------------------------------------------------------------------

def run_ablation(session: Session, layers: list, options: NeuronOptions, out: Path) -> list[dict]:
    results = ablation_runs(session, layers, options)
    records.write_json(out / "ablation.json", {"top_percent": options.top_percent, "results": results})
    atomic_write_text(out / "ablation.md", ablation_table(results, options.top_percent))
    if options.plots:
        plots.ablation_figure(results, out / "ablation.png")
    return results


def ablation_runs(session: Session, layers: list, options: NeuronOptions) -> list[dict]:
    """Dense, then every criterion at every sparsity of its selected rows (and with negative pre-activations
    zeroed): the perplexity on the session's test windows, with the rows chosen on its calibration windows."""
    s = session.settings
    windows = session.calibration()
    roles = {layer.path: layer.role for layer in layers}
    dense = evaluate(session, session.model, desc="dense")
    results = [{"variant": "dense", "criterion": None, "sparsity": 0.0, "ppl": dense["ppl"],
                "eval_tokens": dense["eval_tokens"]}]
    wasserstein = ablation.select_rows(layers, "wasserstein", options.top_percent, options.seed)
    method = get_method("sparsegpt")
    jobs = [(c, p) for c in options.criteria for p in (*options.ablate_sparsities, None)]
    for criterion, sparsity in tqdm(jobs, desc="ablation", disable=s.quiet):
        rows = ablation.select_rows(layers, criterion, options.top_percent, options.seed)
        overlap = _overlap(rows, wasserstein)
        selected = sum(r.numel() for r in rows.values())
        if sparsity is None:
            inputs = {path: r for path, r in rows.items() if roles[path] == "ffn_in"}
            with ablation.zero_negative_preactivations(session.model, inputs):
                result = evaluate(session, session.model, desc=f"{criterion} negative")
            results.append({"variant": "zero-negative", "criterion": criterion, "sparsity": None,
                            "ppl": result["ppl"], "eval_tokens": result["eval_tokens"], "neurons": selected,
                            "overlap_with_wasserstein": overlap})
            continue
        spec = SparsitySpec.create(sparsity=sparsity)

        def prune(model, hooks=None, report=None):
            return prune_model(model, discover(model), windows, method, spec, options=PruneOptions(),
                               device=s.device, batch_size=s.batch_size, progress=False, rows=rows, hooks=hooks,
                               report=report)

        if session.loaded.streamed is not None:  # a copy built block by block into a scratch store, evaluated there
            report, result = build_and_evaluate_streamed(
                session, prune, PruneReport(method="sparsegpt", spec=spec, scope="ffn"),
                {"ablation": criterion, "sparsity": sparsity, "seed": options.seed}, f"{criterion} {sparsity:g}")
        else:
            model = copy.deepcopy(session.model)
            report = prune(model)
            result = evaluate(session, model, desc=f"{criterion} {sparsity:g}")
            del model
        results.append({"variant": "sparsegpt-rows", "criterion": criterion, "sparsity": sparsity,
                        "ppl": result["ppl"], "eval_tokens": result["eval_tokens"], "neurons": selected,
                        "measured_row_sparsity": report.overall_sparsity(), "overlap_with_wasserstein": overlap})
    return results


def ablation_over_seeds(session: Session, blocks: list[int], options: NeuronOptions, seeds: list[int],
                        first: list[dict], out: Path) -> dict:
    """The ablation at every further seed (neurons measured on that draw, its random choice seeded alike), then per
    variant, criterion and sparsity the perplexity's spread and its ratio to the Wasserstein choice's, paired by
    seed (ratio < 1: that choice hurts less than the Wasserstein neurons). Written to ablation_seeds.json/.md."""
    s = session.settings
    runs = {seeds[0]: first}
    for seed in seeds[1:]:
        session.use_seed(seed)
        seeded = dataclasses.replace(options, seed=seed)
        measured = []

        def keep(layer) -> None:
            layer.examples = {}
            measured.append(layer)
            release_memory()

        analyze_neurons(session.model, session.layout, session.calibration(), blocks, keep, seeded.top_percent,
                        seeded.pairs, seed, s.device, s.batch_size, progress=not s.quiet,
                        streamed=session.loaded.streamed)
        runs[seed] = ablation_runs(session, measured, seeded)
    session.use_seed(seeds[0])
    result = ablation_spread(runs, seeds)
    records.write_json(out / "ablation_seeds.json", {"top_percent": options.top_percent, **result})
    atomic_write_text(out / "ablation_seeds.md", ablation_spread_table(result, options.top_percent))
    return result


def _variant_key(row: dict) -> tuple:
    return row["variant"], row["criterion"], row["sparsity"]


def ablation_spread(runs: dict[int, list[dict]], seeds: list[int]) -> dict:
    """Group the seeds' ablation rows by (variant, criterion, sparsity): perplexity mean/std/CI, and the ratio to
    the Wasserstein criterion's row of the same variant and sparsity, seed by seed."""
    by_key = {seed: {_variant_key(r): r for r in rows} for seed, rows in runs.items()}
    groups = []
    for key in by_key[seeds[0]]:
        ppl = [by_key[seed][key]["ppl"] for seed in seeds]
        entry = {"variant": key[0], "criterion": key[1], "sparsity": key[2], "ppl": spread.summarize(ppl)}
        reference = (key[0], "wasserstein", key[2])
        if key[1] not in (None, "wasserstein") and reference in by_key[seeds[0]]:
            entry["vs_wasserstein"] = spread.paired_ratio(ppl, [by_key[seed][reference]["ppl"] for seed in seeds])
        groups.append(entry)
    return {"seeds": seeds, "confidence": spread.CONFIDENCE, "groups": groups, "runs": {str(k): v for k, v in
                                                                                       runs.items()}}


def ablation_spread_table(result: dict, top_percent: float) -> str:
    n = len(result["seeds"])
    lines = [f"Perplexity with the top {top_percent:g}% of each FFN linear's neurons, chosen by each criterion, "
             f"sparsified: mean ± 95% half-width over {n} calibration seeds ({', '.join(map(str, result['seeds']))}), "
             "and the ratio to the Wasserstein choice at the same sparsity, paired by seed (below 1: that choice "
             "hurts less than the Wasserstein neurons).", "",
             "| criterion | variant | sparsity of the selected rows | perplexity | / wasserstein [95% CI] | verdict |",
             "|---|---|---|---|---|---|"]
    for g in result["groups"]:
        sparsity = "-" if g["sparsity"] is None else f"{g['sparsity']:.0%}"
        variant = {"dense": "dense", "zero-negative": "negative pre-activations zeroed"}.get(g["variant"],
                                                                                              "SparseGPT on the rows")
        vs = g.get("vs_wasserstein")
        ratio = "-" if vs is None else f"{vs['mean']:.3f} [{vs['ci_low']:.3f}, {vs['ci_high']:.3f}]"
        words = "-" if vs is None else {"better": "hurts less", "worse": "hurts more"}.get(vs["verdict"],
                                                                                            vs["verdict"])
        lines.append(f"| {g['criterion'] or '-'} | {variant} | {sparsity} | {spread.describe(g['ppl'])} | {ratio} | "
                     f"{words} |")
    return "\n".join(lines) + "\n"


def _overlap(rows: dict, reference: dict) -> float:
    shared = sum(len(set(rows[p].tolist()) & set(reference[p].tolist())) for p in rows)
    return shared / max(1, sum(r.numel() for r in rows.values()))


def ablation_table(results: list[dict], top_percent: float) -> str:
    dense = results[0]["ppl"]
    lines = [f"Perplexity with the top {top_percent:g}% of each FFN linear's neurons, chosen by each criterion, "
             f"sparsified (dense: {dense:.3f}).", "",
             "| criterion | variant | sparsity of the selected rows | perplexity | x dense | overlap with WD choice |",
             "|---|---|---|---|---|---|"]
    for r in results[1:]:
        sparsity = "-" if r["sparsity"] is None else f"{r['sparsity']:.0%}"
        variant = "negative pre-activations zeroed" if r["variant"] == "zero-negative" else "SparseGPT on the rows"
        lines.append(f"| {r['criterion']} | {variant} | {sparsity} | {r['ppl']:.3f} | {r['ppl'] / dense:.3f} | "
                     f"{r['overlap_with_wasserstein']:.2f} |")
    return "\n".join(lines) + "\n"


# -- disentanglement ---------------------------------------------------------------------------------------

def run_disentanglement(session: Session, blocks: list[int], options: NeuronOptions, out: Path) -> dict:
    s = session.settings
    loaded = load_model(options.expanded, dtype=s.dtype, device="cpu", trust_remote_code=s.trust_remote_code,
                        quiet=True)
    expanded = loaded.model
    layout = discover(expanded)
    if len(layout.blocks) != len(session.layout.blocks) or layout.blocks_path != session.layout.blocks_path:
        raise SettingError("expanded", f"{{expanded}} {literal(options.expanded)}: its blocks do not match the "
                                       f"model's ({len(layout.blocks)} against {len(session.layout.blocks)})")
    figure_dir = out / "disentanglement"
    figure_dir.mkdir()
    per_layer, pooled = [], {key: [] for key in ("wd_dense", "wd_weighted", "md_dense", "md_weighted", "selected")}

    def on_layer(index, name, role, module, inputs) -> None:
        path = f"{session.layout.blocks_path}.{index}.{name}"
        router = getattr(expanded.get_submodule(path), "router", None)
        if router is None:
            raise SettingError("expanded", f"{{expanded}} {literal(options.expanded)}: {path} is not an expert layer")
        result = disentangle.layer_disentanglement(module, router, inputs, options.top_percent, options.seed)
        selected = torch.zeros_like(result["wd_dense"], dtype=torch.bool)
        selected[result["wasserstein_neurons"]] = True
        for key in ("wd_dense", "wd_weighted", "md_dense", "md_weighted"):
            pooled[key].append(result[key])
        pooled["selected"].append(selected)
        rows = result["wasserstein_neurons"]
        per_layer.append({"layer": path, "block": index, "name": name, "cluster_sizes": result["cluster_sizes"],
                          "gaussian_floor": result["gaussian_floor"],
                          "wd_wasserstein_neurons": disentangle.change_summary(result["wd_dense"],
                                                                                result["wd_weighted"], rows),
                          "wd_all_neurons": disentangle.change_summary(result["wd_dense"], result["wd_weighted"]),
                          "md_wasserstein_neurons": disentangle.change_summary(result["md_dense"],
                                                                                result["md_weighted"], rows),
                          "md_all_neurons": disentangle.change_summary(result["md_dense"], result["md_weighted"])})
        if options.plots:
            plots.disentanglement_figure(result["wd_dense"].numpy(), result["wd_weighted"].numpy(),
                                         selected.numpy(), result["md_dense"].numpy(), result["md_weighted"].numpy(),
                                         figure_dir / f"{index:03d}.{name}.png", path, result["gaussian_floor"])
        release_memory()

    walk_ffn_inputs(session.model, session.layout, session.calibration(), blocks, on_layer, s.device, s.batch_size,
                    progress=not s.quiet, desc="disentanglement")
    cat = {key: torch.cat(values) for key, values in pooled.items()}
    result = {"expanded": options.expanded, "experts": options._manifest.get("experts"),
              "sparsity": options._manifest.get("sparsity"),
              "wd_wasserstein_neurons": disentangle.change_summary(cat["wd_dense"], cat["wd_weighted"],
                                                                   cat["selected"]),
              "wd_all_neurons": disentangle.change_summary(cat["wd_dense"], cat["wd_weighted"]),
              "md_wasserstein_neurons": disentangle.change_summary(cat["md_dense"], cat["md_weighted"],
                                                                   cat["selected"]),
              "md_all_neurons": disentangle.change_summary(cat["md_dense"], cat["md_weighted"]),
              "gaussian_floor_median": {key: statistics.median(layer["gaussian_floor"][key] for layer in per_layer)
                                        for key in ("dense", "weighted")},
              "layers": per_layer}
    if options.sweep_experts:
        result["expert_sweep"] = run_expert_sweep(session, blocks, options, figure_dir)
    records.write_json(out / "disentanglement.json", result)
    return {k: v for k, v in result.items() if k != "layers"}


def run_expert_sweep(session: Session, blocks: list[int], options: NeuronOptions, out: Path) -> dict:
    """One neuron (the highest WD of the first FFN input linear of the first analysed block after block 0, as
    in the paper's second FFN): its dense outputs against its sparse outputs with 1, 2, 4, ... experts."""
    from scipy.stats import wasserstein_distance

    manifest = options._manifest
    sparsity = manifest.get("sparsity")
    spec = SparsitySpec.create(sparsity=sparsity) if sparsity is not None else SparsitySpec.create(nm=manifest["nm"])
    index = blocks[1] if len(blocks) > 1 else blocks[0]
    name = session.layout.input_groups("ffn").get("in", next(iter(session.layout.input_groups("ffn").values())))[0]
    path = f"{session.layout.blocks_path}.{index}.{name}"
    captured = {}

    def on_layer(i, layer_name, role, module, inputs) -> None:
        if layer_name == name:
            captured["module"], captured["inputs"] = module, inputs.clone()

    s = session.settings
    walk_ffn_inputs(session.model, session.layout, session.calibration(), [index], on_layer, s.device, s.batch_size,
                    progress=False)
    module, inputs = captured["module"], captured["inputs"]
    dense = layer_outputs(module, inputs)
    neuron = int(torch.nan_to_num(wasserstein_to_gaussian(dense), nan=-math.inf).argmax())
    sparse, distances = {}, {}
    for experts in options.sweep_experts:
        config = ExpansionConfig(experts=experts, pca_reduction=manifest.get("pca_reduction", 32),
                                 seed=options.seed, method=manifest.get("expert_method", "sparsegpt"))
        router, weights, bias = expand_linear(module, inputs, spec, config, PruneOptions())
        labels = router.assign(inputs)
        row = weights[:, neuron, :][labels]  # each token's expert row
        values = (row * inputs.float()).sum(1) + (0 if bias is None else bias[neuron].float())
        sparse[experts] = values.detach().cpu()
        distances[experts] = float(wasserstein_distance(dense[:, neuron].double().numpy(), values.double().numpy()))
    if options.plots:
        plots.expert_sweep_figure(dense[:, neuron].cpu(), sparse, distances, out / "expert_sweep.png",
                                  f"{path}, neuron {neuron}, {spec.label}")
    return {"layer": path, "neuron": neuron, "sparsity": spec.label, "w1_to_dense": distances}
