"""`quantize_`: the PrefixQuant pipeline for a `PrefixQuantConfig`, torchao's `quantize_` for any other config.

Pipeline (docs/architecture.md): structure -> fold norms -> rotate (R1, R2 fused; R3, R4 online) -> outlier
tokens -> prefix KV -> block-wise statistics, grid search and conversion. In place, like torchao's. Each phase
logs what it does (INFO, logger `pq_ao.api`; `pq-ao quantize` prints them) and the long ones show tqdm bars.
"""

from __future__ import annotations

import logging
import time
import warnings

import torch
from torch import nn
from torchao.quantization import quantize_ as _torchao_quantize_
from torchao.quantization.transform_module import register_quantize_module_handler

from pq_ao.calibration.grid_search import calibrate_blocks
from pq_ao.calibration.outliers import find_prefix, token_decoder, token_max_summary, top_median_ratio
from pq_ao.calibration.sites import block_sites
from pq_ao.config import PrefixQuantConfig
from pq_ao.kernels import enable_compile_memo
from pq_ao.passes import attach_attention, check_supported, find_structure, fold_norms, fuse_projections, rotate_model
from pq_ao.passes.prefix import install_prefix
from pq_ao.state import PrefixQuantState, QuantizationReport, require_state, state_of

__all__ = ["PrefixQuantState", "QuantizationReport", "calibration_data", "prefixquant", "quantize_",
           "resolve_tokenizer"]

log = logging.getLogger(__name__)


def resolve_tokenizer(model: nn.Module):
    """The tokenizer of a model from `pq_ao.load_model`, or of an HF model from its `name_or_path`."""
    state = state_of(model)
    if state is not None and state.tokenizer is not None:
        return state.tokenizer
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if name:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError):
            pass
    raise ValueError(
        "no tokenizer found for this model (not loaded with pq_ao.load_model, and no tokenizer at its "
        "name_or_path): pass calibration token ids, prefixquant_w4a4(calibration=LongTensor[n, seqlen]), "
        "or quantize_(model, config, tokenizer=...)"
    )


def _optional_tokenizer(model: nn.Module):
    try:
        return resolve_tokenizer(model)
    except ValueError:
        return None


def calibration_data(config: PrefixQuantConfig, tokenizer):
    """(outlier-search tokens [n_samples, seqlen], block-wise calibration tokens [grid_samples, grid_seqlen],
    fine-tuning tokens [ft_samples, ft_seqlen] or None without `finetune`). Token ids given directly serve all three
    (as given; no re-windowing)."""
    from pq_ao import data

    calib = config.calibration
    if isinstance(calib, torch.Tensor):
        return calib[: config.n_samples], calib[: config.grid_samples], (
            calib[: config.ft_samples] if config.finetune else None)
    if tokenizer is None:
        raise ValueError("calibration text needs a tokenizer: pass token ids instead")
    text = list(calib) if isinstance(calib, (list, tuple)) else calib
    outlier = data.calibration_tokens(tokenizer, text, n=config.n_samples, seqlen=config.seqlen, seed=config.seed)
    grid = data.calibration_tokens(
        tokenizer, text, n=config.grid_samples, seqlen=config.grid_seqlen, seed=config.seed + 1
    )
    ft = None
    if config.finetune:
        ft = data.calibration_tokens(tokenizer, text, n=config.ft_samples, seqlen=config.ft_seqlen, seed=config.seed + 2)
    return outlier, grid, ft


def _describe_calibration(calib) -> str:
    if isinstance(calib, torch.Tensor):
        return f"token ids {list(calib.shape)}"
    return f"{len(calib)} texts" if isinstance(calib, (list, tuple)) else str(calib)


def _check_token_ids(model: nn.Module, *batches: torch.Tensor) -> None:
    """Calibration token ids inside the vocabulary (checked before the model is touched)."""
    vocab = model.get_input_embeddings().num_embeddings
    for ids in batches:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"calibration token ids must lie in [0, {vocab}) (the model's vocabulary), got ids in "
                             f"[{lo}, {hi}]")


def _calibration_used(config: PrefixQuantConfig, outlier_ids: torch.Tensor, grid_ids: torch.Tensor,
                      ft_ids: torch.Tensor | None) -> dict:
    """The calibration sizes actually used (token ids are used as given); a warning where they are fewer or shorter
    than the config asks."""
    used = {"n_samples": int(outlier_ids.shape[0]), "seqlen": int(outlier_ids.shape[1]),
            "grid_samples": int(grid_ids.shape[0]), "grid_seqlen": int(grid_ids.shape[1])}  # fmt: skip
    if ft_ids is not None:
        used.update(ft_samples=int(ft_ids.shape[0]), ft_seqlen=int(ft_ids.shape[1]))
    short = [f"{k} {v} < {getattr(config, k)}" for k, v in used.items() if v < getattr(config, k)]
    if short:
        warnings.warn(f"calibration smaller than the config asks ({', '.join(short)}): quantizing with what was "
                      "given (the report records the sizes used)", stacklevel=3)  # fmt: skip
    return used


GPTQ_TOKENS_PER_INPUT = 8  # GPTQ's Hessian wants many more tokens than input features (SmolLM2: 1024 -> 4096 tokens
# for K <= 1536 took static W4A4KV4 + GPTQ from 53.2 to 46.5 WikiText-2 ppl, benchmarks/RESULTS.md section 2)


def _check_gptq_tokens(model: nn.Module, config: PrefixQuantConfig, used: dict) -> None:
    """A warning when GPTQ's Hessians (the grid calibration's tokens) are few for the widest linear input."""
    cfg = model.config
    widest = max(getattr(cfg, "hidden_size", 0) or 0, getattr(cfg, "intermediate_size", 0) or 0)
    tokens = used["grid_samples"] * used["grid_seqlen"]
    if config.gptq and widest and tokens < GPTQ_TOKENS_PER_INPUT * widest:
        warnings.warn(f"GPTQ's Hessians come from grid_samples x grid_seqlen = {tokens} tokens, fewer than "
                      f"{GPTQ_TOKENS_PER_INPUT} x the widest linear input ({widest}): its rounding fits those tokens "
                      f"and generalises worse; pass grid_samples x grid_seqlen >= {GPTQ_TOKENS_PER_INPUT * widest}",
                      stacklevel=3)  # fmt: skip


@torch.no_grad()
def prefixquant(model: nn.Module, config: PrefixQuantConfig, tokenizer=None) -> QuantizationReport:
    """Run the whole PrefixQuant pipeline on `model` in place; returns the report (also in the model's state,
    `pq_ao.state.state_of(model).report`)."""
    state = require_state(model)
    if state.quantized:
        raise ValueError(f"this model is already quantized by pq_ao ({state.config.name}): quantize the "
                         "full-precision model (pq_ao.load_model) instead")
    check_supported(model, prefix=config.prefix)  # before anything is changed
    t = {"start": time.perf_counter()}

    def lap(name: str) -> None:
        now = time.perf_counter()
        t[name] = now - t.pop("_last", t["start"])
        t["_last"] = now

    if not isinstance(config.calibration, torch.Tensor):
        tokenizer = tokenizer or resolve_tokenizer(model)
    elif tokenizer is None:  # token ids need no tokenizer; the prefix separator then comes from the config
        tokenizer = _optional_tokenizer(model)
    model.eval()
    log.info("%s: calibration data (%s)", config.name, _describe_calibration(config.calibration))
    outlier_ids, grid_ids, ft_ids = calibration_data(config, tokenizer)
    _check_token_ids(model, *(t for t in (outlier_ids, grid_ids, ft_ids) if t is not None))
    used = _calibration_used(config, outlier_ids, grid_ids, ft_ids)
    _check_gptq_tokens(model, config, used)
    log.info("model structure: tracing one decoder block")
    structure = find_structure(model)  # reads the model (one traced forward), changes nothing
    lap("data")
    stage = "folding the norms"
    try:  # from here on the model changes: a failure says in what state it is left
        log.info("folding the norms%s", ", rotating (R1, R2 fused; R3, R4 online)" if config.rotate else "")
        fold_norms(model, structure)
        stage = "rotating"
        if config.rotate:
            rotate_model(model, structure, seed=config.seed)
        else:
            attach_attention(model, structure, rotate_qk=False)
        blocks = block_sites(model, structure)
        lap("rotate")
        prefix = None
        stage = "finding and installing the prefix"
        if config.prefix:
            log.info("outlier tokens: %d x %d tokens through the full-precision model", *outlier_ids.shape)
            downs = [b.down for b in blocks]
            prefix = find_prefix(model, downs, outlier_ids, tokenizer, config.eta, config.max_prefix_len)
            log.info("prefix %s (o=%d): computing and installing its KV", prefix.prefix_tokens,
                     prefix.n_outlier_tokens)
            install_prefix(model, [b.attn for b in blocks], prefix.prefix_ids)
        lap("prefix")
        stage = "calibrating and converting the blocks"
        log.info("calibrating %d blocks on %d x %d tokens: statistics, %s, conversion%s", len(blocks), *grid_ids.shape,
                 "grid search" if config.grid_search else "min-max scales",
                 "" if ft_ids is None else f", fine-tuning on {ft_ids.shape[0]} x {ft_ids.shape[1]} tokens")
        plans, stats = calibrate_blocks(model, blocks, grid_ids, config, ft_ids)
    except Exception as e:
        raise RuntimeError(f"quantize_ failed while {stage} ({type(e).__name__}: {e}); the model is left partly "
                           f"transformed (norms folded{', rotated' if stage != 'folding the norms' else ''}, "
                           "possibly some blocks converted): load it again before retrying") from e  # fmt: skip
    if prefix is not None:
        tmax_after = stats.down_token_max_tensor()
        prefix.ratio_after = top_median_ratio(tmax_after).tolist()
        prefix.token_max_after = token_max_summary(tmax_after, grid_ids, token_decoder(tokenizer))
    lap("grid_search")
    t.pop("start"), t.pop("_last")
    log.info("quantized in %.1f s (%s)", sum(t.values()), ", ".join(f"{k} {v:.1f} s" for k, v in t.items()))
    if config.fuse_projections:
        fused = fuse_projections(model)
        log.info("fused %d q/k/v and gate/up groups into single linears", len(fused))
    report = QuantizationReport(config=config.to_dict(), prefix=prefix, blocks=plans, seconds=t, calibration=used)
    enable_compile_memo()  # the model now runs our kernels: compiling it should not repeat their analysis
    state.config, state.report = config, report
    return report


@register_quantize_module_handler(PrefixQuantConfig)
def _prefixquant_handler(module: nn.Module, config: PrefixQuantConfig, **_kwargs) -> nn.Module:
    """torchao's registry entry: PrefixQuant transforms a whole causal LM, never a single linear."""
    if not hasattr(module, "get_decoder"):
        raise TypeError(
            f"PrefixQuantConfig transforms a whole causal LM, not a {type(module).__name__}: "
            "call pq_ao.quantize_(model, config), or torchao's quantize_ with filter_fn=lambda m, fqn: fqn == ''"
        )
    prefixquant(module, config)
    return module


def quantize_(model: nn.Module, config, filter_fn=None, device=None, tokenizer=None):
    """Quantize `model` in place. A `PrefixQuantConfig` runs the PrefixQuant pipeline on the whole causal LM and
    returns its `QuantizationReport`; any other torchao `AOBaseConfig` goes to torchao's `quantize_` unchanged."""
    if isinstance(config, PrefixQuantConfig):
        if filter_fn is not None:
            raise ValueError("PrefixQuantConfig quantizes every decoder linear; filter_fn is not supported")
        if device is not None:
            model.to(device)
        return prefixquant(model, config, tokenizer)
    return _torchao_quantize_(model, config, filter_fn=filter_fn, device=device)
