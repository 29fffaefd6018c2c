"""What pq_ao knows about a model, in one place: a `PrefixQuantState` at `model.config.quantization_config`.

That is where HF keeps a model's quantization config (and torchao its `TorchAoConfig`), so `config.json` carries
it when the model is saved: `quant_method: "pq_ao"`, the `PrefixQuantConfig`, the rotation seeds and sizes, the
prefix ids, where the full-precision model came from, and the quantization report. Two fields live in memory only:
the tokenizer (saved by its own `save_pretrained`) and the handles of the prefix pass's hooks.

Invariants: a model has at most one state, created by `load_model` (source, tokenizer) or `quantize_` and
completed by the passes (rotation, prefix); every reader goes through `state_of` / `require_state`, never through
attributes set ad hoc on the model; `PrefixQuantState.from_dict(s.to_dict())` equals `s` (in-memory fields aside).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from pq_ao.config import PrefixQuantConfig

if TYPE_CHECKING:  # the calibration modules import this one (through the passes): no import cycle at run time
    from pq_ao.calibration.grid_search import BlockPlan
    from pq_ao.calibration.outliers import PrefixReport


@dataclass
class QuantizationReport:
    """What `quantize_` did: the config, the prefix found, per-block calibration results, wall times."""

    config: dict
    prefix: PrefixReport | None
    blocks: list[BlockPlan] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, int] = field(default_factory=dict)  # the sizes used (n_samples, seqlen, grid_*)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantizationReport":
        from pq_ao.calibration.grid_search import BlockPlan
        from pq_ao.calibration.outliers import PrefixReport

        prefix = None
        if d.get("prefix") is not None:
            p = dict(d["prefix"])
            p["outlier_token_counts"] = {int(k): v for k, v in p.get("outlier_token_counts", {}).items()}
            prefix = PrefixReport(**p)
        return cls(config=d["config"], prefix=prefix, blocks=[BlockPlan(**b) for b in d.get("blocks", [])],
                   seconds=dict(d.get("seconds", {})), calibration=dict(d.get("calibration", {})))  # fmt: skip

    def summary(self) -> str:
        lines = [f"pq_ao {restore_config(self.config).name}: {sum(self.seconds.values()):.1f} s"]
        if self.prefix is not None:
            lines.append("  " + self.prefix.summary())
        if self.blocks:
            worst = max(range(len(self.blocks)), key=lambda i: self.blocks[i].mse_after)
            lines.append(f"  block-output MSE, worst block {worst}: {self.blocks[worst].mse_after:.3g}")
        return "\n".join(lines)


def restore_config(d: dict) -> PrefixQuantConfig:
    """A `PrefixQuantConfig` from its `to_dict()`. Calibration token ids or texts were recorded by shape only:
    they come back as the default dataset name (the record of what was used stays in the dict)."""
    d = dict(d)
    if not isinstance(d.get("calibration"), str) or d["calibration"].startswith("<"):
        d["calibration"] = PrefixQuantConfig.calibration
    known = {f.name for f in fields(PrefixQuantConfig)}
    return PrefixQuantConfig(**{k: v for k, v in d.items() if k in known})


@dataclass
class PrefixQuantState:
    """pq_ao's record of a model (see the module docstring)."""

    QUANT_METHOD: ClassVar[str] = "pq_ao"

    source: str | None = None
    config: PrefixQuantConfig | None = None
    rotation: dict | None = None
    prefix_ids: list[int] = field(default_factory=list)
    report: QuantizationReport | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)  # in memory only
    hooks: list = field(default_factory=list, repr=False, compare=False)  # the prefix pass's hook handles, in memory

    @property
    def quantized(self) -> bool:
        return self.config is not None

    def to_dict(self) -> dict:
        """JSON-safe: what `config.json` holds under `quantization_config`."""
        return {
            "quant_method": self.QUANT_METHOD,
            "source": self.source,
            "config": None if self.config is None else self.config.to_dict(),
            "rotation": self.rotation,
            "prefix_ids": list(self.prefix_ids),
            "report": None if self.report is None else self.report.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PrefixQuantState":
        if d.get("quant_method") != cls.QUANT_METHOD:
            raise ValueError(f"not a pq_ao quantization_config (quant_method {d.get('quant_method')!r})")
        return cls(
            source=d.get("source"),
            config=None if d.get("config") is None else restore_config(d["config"]),
            rotation=d.get("rotation"),
            prefix_ids=[int(i) for i in d.get("prefix_ids") or []],
            report=None if d.get("report") is None else QuantizationReport.from_dict(d["report"]),
        )

    def __deepcopy__(self, memo) -> "PrefixQuantState":
        """A copy that shares the tokenizer (HF's `config.to_dict()` deep-copies the config). The hook handles are
        deep-copied through `memo`: in a `copy.deepcopy(model)` they then point at the copy's own hooks."""
        import copy

        return PrefixQuantState(source=self.source, config=copy.deepcopy(self.config, memo),
                                rotation=copy.deepcopy(self.rotation, memo), prefix_ids=list(self.prefix_ids),
                                report=copy.deepcopy(self.report, memo), tokenizer=self.tokenizer,
                                hooks=copy.deepcopy(self.hooks, memo))  # fmt: skip


def state_of(model: nn.Module) -> PrefixQuantState | None:
    """The model's state, or None for a model pq_ao has not touched."""
    q = getattr(getattr(model, "config", None), "quantization_config", None)
    return q if isinstance(q, PrefixQuantState) else None


def require_state(model: nn.Module) -> PrefixQuantState:
    """The model's state, created (empty) where there is none. A model quantized by another library is refused."""
    state = state_of(model)
    if state is not None:
        return state
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no HF config: pq_ao works on HF causal LMs")
    other = getattr(config, "quantization_config", None)
    if isinstance(other, dict) and other.get("quant_method") == PrefixQuantState.QUANT_METHOD:
        state = PrefixQuantState.from_dict(other)  # an HF directory written from a model pq_ao had touched
        config.quantization_config = state
        return state
    if other is not None:
        method = other.get("quant_method") if isinstance(other, dict) else getattr(other, "quant_method", other)
        raise ValueError(f"this model is already quantized ({method}): pq_ao quantizes full-precision models")
    state = PrefixQuantState()
    config.quantization_config = state
    return state
