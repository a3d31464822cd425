"""Compare techniques on the same calibration and test windows.

The techniques come from the registries: `dense`, every pruning method (pruning/methods.py) and Sparse
Expansion (whose experts are pruned by a method of the same registry). Each says whether it reads
calibration data, supports joint quantization and which linears it touches, so a new pruning method
appears here, in the CLI and in the manifest without edits to this file.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable

from ..errors import UsageError
from ..expansion import ExpansionConfig
from ..models import discover, ffn_costs
from ..pruning import METHODS, PruneOptions, SparsitySpec, get_method
from .jobs import evaluate, expand_session_model, prune_session_model
from .session import Session

EXPANSION = "sparse-expansion"


@dataclass(frozen=True)
class Technique:
    name: str
    uses_data: bool  # needs calibration windows
    supports_bits: bool
    scope: str | None  # the linears it touches when fixed ("ffn"), else None: the session's --scope
    per_experts: bool = False  # one run per expert count
    # (session, model, spec, options, experts, expansion config) -> report with .seconds and .overall_sparsity()
    apply: Callable | None = None


def _prune(name: str) -> Callable:
    def apply(session, model, spec, options, experts, config):
        return prune_session_model(session, model, name, spec, options)
    return apply


def _expand(session, model, spec, options, experts, config):
    return expand_session_model(session, model, spec, options, dataclasses.replace(config, experts=experts))


def techniques() -> dict[str, Technique]:
    found = {"dense": Technique("dense", uses_data=False, supports_bits=False, scope=None)}
    for name, method in METHODS.items():
        found[name] = Technique(name, uses_data=method.statistic is not None, supports_bits=method.supports_bits,
                                scope=None, apply=_prune(name))
    found[EXPANSION] = Technique(EXPANSION, uses_data=True, supports_bits=True, scope="ffn", per_experts=True,
                                 apply=_expand)
    return found


def technique(name: str) -> Technique:
    known = techniques()
    if name not in known:
        raise UsageError(f"unknown method {name!r}; choose from {', '.join(known)}")
    return known[name]


def compare(session: Session, methods: list[str], specs: list[SparsitySpec], options: PruneOptions,
            experts: list[int] | None = None, expansion: ExpansionConfig | None = None) -> list[dict]:
    """Each method at each sparsity (and each expert count) on the same calibration and test windows."""
    expansion = expansion or ExpansionConfig()
    experts = experts or [expansion.experts]
    chosen = [technique(name) for name in methods]
    for t in chosen:
        if t.per_experts:
            for k in experts:
                dataclasses.replace(expansion, experts=k).validate()
        elif options.bits is not None and t.apply is not None and not t.supports_bits:
            get_method(t.name, options.bits)  # the registry's one-line error
    s = session.settings
    session.evaluation()  # fail early on data problems, before any pruning
    if any(t.uses_data for t in chosen):
        session.calibration()
    calib_tokens = int(session.calib.numel()) if session.calib is not None else 0
    jobs = []
    for t in chosen:
        if t.apply is None:
            jobs.append((t, None, None))
        else:
            for spec in specs:
                for k in (experts if t.per_experts else [None]):
                    jobs.append((t, spec, k))
    rows = []
    for t, spec, k in jobs:
        model = session.model if t.apply is None else copy.deepcopy(session.model)
        seconds, measured = 0.0, 0.0
        if t.apply is not None:
            report = t.apply(session, model, spec, options, k, expansion)
            seconds, measured = report.seconds, report.overall_sparsity()
        row = {
            "method": t.name,
            "sparsity": spec.sparsity if spec else 0.0,
            "nm": f"{spec.n}:{spec.m}" if spec and spec.is_nm else None,
            "experts": k,
            "bits": options.bits if t.supports_bits else None,
            "scope": t.scope or s.scope,
            "seqlen": s.seqlen,
            "seed": s.seed,
            "calib_tokens": calib_tokens if t.uses_data else 0,
            "seconds": seconds,
            "measured_sparsity": measured,
        }
        row.update(ffn_costs(model, discover(model)))
        row.update(evaluate(session, model, desc=f"ppl {t.name}"))
        rows.append(row)
        if model is not session.model:
            del model
    return rows
