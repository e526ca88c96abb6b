"""The per-cell errors the engine records, typed by what they are, with their saved form (docs/commands.md).

A cell is one (image, logSNR point) of a run; every field is (N, J) float64, or (N, J, C) for the packed noise
moments. The model's own projections sit under a member label ("" for the scored model, one label per
member when `itd ensemble` merges runs); the Gaussian reference's exact errors and the mean-zero control
variates are shared by all members, since every member is evaluated on the same images, points and noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Literal, get_args

import torch
from torch import Tensor

from itdcli.core import controls

Projection = Literal["model", "round", "deq", "deq_cell"]  # clamped (or raw), rounded; on x̃ clamped, cell posterior
Reference = Literal["gauss", "gauss_deq"]  # the Gaussian denoiser's exact pointwise error at x and at x̃
Control = Literal["cv", "cv_deq", "moments", "deq_moments"]  # mean zero for every x and γ (docs/math.md)
PROJECTIONS: tuple[Projection, ...] = get_args(Projection)
REFERENCES: tuple[Reference, ...] = get_args(Reference)
# the columns of the packed moments, as saved (mse/ctl_*, mse/deq_*)
PACKED: dict[str, tuple[str, ...]] = {"moments": controls.NAMES, "deq_moments": controls.DEQ_NAMES}
ROOT = "mse/"


@dataclass(frozen=True)
class Candidate:
    """A denoiser the per-logSNR choice may take: one member's projection, or the Gaussian reference."""

    kind: Projection | Reference
    member: str = ""  # the ensemble member's label; "" for the scored model and for the reference

    @property
    def key(self) -> str:
        """The candidate's name in result.json and ensemble.json: the kind, after "member/" in an ensemble."""
        return f"{self.member}/{self.kind}" if self.member else self.kind

    @property
    def exact(self) -> bool:
        """Whether its error is an exact expectation over the noise (nothing for a control variate to remove)."""
        return self.kind in REFERENCES


@dataclass(frozen=True)
class Projections:
    """One denoiser's ε-unit errors per cell: on x clamped (raw on float data) and rounded; on x̃ clamped and
    refined to the posterior mean within the grid cell of its nearest level."""

    model: Tensor | None = None
    round: Tensor | None = None
    deq: Tensor | None = None
    deq_cell: Tensor | None = None

    def get(self, kind: Projection) -> Tensor | None:
        """The error of one projection, None when it was not recorded."""
        return {"model": self.model, "round": self.round, "deq": self.deq, "deq_cell": self.deq_cell}[kind]

    def map(self, f: Callable[[Tensor], Tensor]) -> Projections:
        """`f` applied to every recorded error."""
        return Projections(*(None if (t := self.get(k)) is None else f(t) for k in PROJECTIONS))


@dataclass(frozen=True)
class CellErrors:
    """Per-cell errors: each member's projections, the Gaussian's exact errors and the control variates."""

    members: Mapping[str, Projections] = field(default_factory=lambda: {"": Projections()})
    gauss: Tensor | None = None
    gauss_deq: Tensor | None = None
    cv: Tensor | None = None  # the Gaussian's error on the cell's own noise draw less `gauss` (spec §5)
    cv_deq: Tensor | None = None
    moments: Tensor | None = None  # (N, J, 12) noise moments per class of pixel, controls.NAMES order
    deq_moments: Tensor | None = None  # (N, J, 6) dequantization moments, controls.DEQ_NAMES order

    def error(self, c: Candidate) -> Tensor | None:
        """A candidate's per-cell error, None when it was not recorded."""
        if c.kind == "gauss" or c.kind == "gauss_deq":
            return self.gauss if c.kind == "gauss" else self.gauss_deq
        own = self.members.get(c.member)
        return None if own is None else own.get(c.kind)

    def stack(self, names: Sequence[Candidate]) -> Tensor:
        """The per-cell errors of the named candidates, stacked (K, N, J) in their order; each must be recorded."""
        return torch.stack([_need(self.error(c)) for c in names])

    def candidates(self) -> Iterator[tuple[Candidate, Tensor]]:
        """Every recorded candidate with its error: each member's projections, then the Gaussian's."""
        for member, own in self.members.items():
            yield from ((Candidate(k, member), t) for k in PROJECTIONS if (t := own.get(k)) is not None)
        yield from ((Candidate(k), t) for k in REFERENCES if (t := self.error(Candidate(k))) is not None)

    def controls(self, names: Sequence[Control]) -> Tensor | None:
        """The recorded control variates among `names` as (C, N, J), packed moments column by column, in order."""
        found: list[Tensor] = []
        for name in names:
            t = self._shared()[name]
            if t is not None:
                found.extend(t.unbind(-1) if name in PACKED else [t])
        return torch.stack(found) if found else None

    def _shared(self) -> dict[str, Tensor | None]:
        """The fields every member shares, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "members"}

    def map(self, f: Callable[[Tensor], Tensor]) -> CellErrors:
        """`f` applied to every recorded tensor (a row selection, a device move, a gather over ranks)."""
        shared = {k: None if t is None else f(t) for k, t in self._shared().items()}
        return replace(self, members={m: p.map(f) for m, p in self.members.items()}, **shared)

    def only(self, keep: Callable[[str], bool]) -> CellErrors:
        """The same errors with only the fields whose name `keep` accepts (projections by kind)."""
        shared = {k: t if keep(k) else None for k, t in self._shared().items()}
        members = {
            m: Projections(*(p.get(k) if keep(k) else None for k in PROJECTIONS)) for m, p in self.members.items()
        }
        return replace(self, members=members, **shared)

    def recorded(self) -> Iterator[str]:
        """The names of the recorded fields (projections by kind, over all members)."""
        yield from (k for k, t in self._shared().items() if t is not None)
        yield from sorted({k for p in self.members.values() for k in PROJECTIONS if p.get(k) is not None})

    def to_arrays(self, prefix: str = "") -> dict[str, Tensor]:
        """The saved form of a one-model run: mse/NAME (N, J) float32 per field, packed moments per column."""
        if set(self.members) != {""}:
            raise ValueError("only a one-model run's errors have a saved form")
        out: dict[str, Tensor] = {}
        for kind in PROJECTIONS:
            t = self.members[""].get(kind)
            if t is not None:
                out[f"{prefix}{ROOT}{kind}"] = t.to(torch.float32)
        for name, t in self._shared().items():
            if t is not None:
                columns = PACKED.get(name, (name,))
                parts = t.unbind(-1) if name in PACKED else (t,)
                out.update({f"{prefix}{ROOT}{c}": v.to(torch.float32) for c, v in zip(columns, parts, strict=True)})
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Tensor], prefix: str = "") -> CellErrors:
        """The errors a run saved with `to_arrays`, in float64 (packed moments only when every column is there)."""

        def read(name: str) -> Tensor | None:
            t = arrays.get(f"{prefix}{ROOT}{name}")
            return None if t is None else t.double()

        def packed(columns: tuple[str, ...]) -> Tensor | None:
            parts = [read(c) for c in columns]
            return None if any(p is None for p in parts) else torch.stack([p for p in parts if p is not None], -1)

        own = Projections(*(read(k) for k in PROJECTIONS))
        return cls(
            {"": own},
            read("gauss"),
            read("gauss_deq"),
            read("cv"),
            read("cv_deq"),
            packed(controls.NAMES),
            packed(controls.DEQ_NAMES),
        )

    @staticmethod
    def cat(parts: Sequence[CellErrors], dim: int) -> CellErrors:
        """Parts with the same recorded fields joined along `dim` (0: more images; 1: more points per image)."""
        first = parts[0]
        shared = {
            k: None if t is None else torch.cat([_need(p._shared()[k]) for p in parts], dim)
            for k, t in first._shared().items()
        }
        members = {m: _cat_projections([p.members[m] for p in parts], dim) for m in first.members}
        return replace(first, members=members, **shared)


def _cat_projections(parts: Sequence[Projections], dim: int) -> Projections:
    """One denoiser's projections from parts with the same recorded kinds, joined along `dim`."""
    first = parts[0]
    return Projections(
        *(None if first.get(k) is None else torch.cat([_need(p.get(k)) for p in parts], dim) for k in PROJECTIONS)
    )


def _need(t: Tensor | None) -> Tensor:
    """A field that must have been recorded (by every part joined, or for every candidate stacked)."""
    if t is None:
        raise ValueError("the errors do not record every field asked for: parts joined must record the same fields")
    return t


def columns(names: Sequence[str]) -> int:
    """How many (N, J) arrays the named fields hold once saved (a packed field is one per column)."""
    return sum(len(PACKED.get(n, (n,))) for n in names)


def merged(runs: Mapping[str, CellErrors]) -> CellErrors:
    """One set of errors for an ensemble: every run's own projections under its label, the first run's shared fields."""
    first = next(iter(runs.values()))
    return replace(first, members={label: e.members[""] for label, e in runs.items()})
