"""What `fuse` did: each rewrite, each place left alone and why, and the before/after counts."""
from __future__ import annotations

from dataclasses import dataclass, field

from .stats import Stats


@dataclass(frozen=True)
class Rewrite:
    """One rewrite `fuse` applied.

    Attributes:
        rule: the rule's name (`merge_sequential`, `merge_sum`, ...).
        path: the module path of the op it produced, in the model (`stage3.2.reparam`).
        detail: what it merged (`conv → bn`, `4 terms → 1`).
        shape: the produced weight's shape, `Conv2d(out, in/groups, kh, kw)`
            (`reparam.summary.named_shape` spells it out).
        key: the engine's key of the rewrite: the same in every fuse of the model.
    """
    rule: str
    path: str
    detail: str
    shape: str = ""
    key: tuple = field(default=(), compare=False, repr=False)  # engine.key: the same in every fuse


@dataclass(frozen=True)
class Skip:
    """A place a rule left alone.

    Attributes:
        rule: the rule that refused.
        path: the module path of the ops it looked at.
        reason: why, in words a user can act on.
    """
    rule: str
    path: str
    reason: str


@dataclass(frozen=True)
class Untraced:
    """A module no front end could trace: its Python runs as written, and each child of it
    that traces is fused on its own.

    Attributes:
        path: its module path.
        message: the tracer's error, first line.
        fused_below: rewrites applied inside it (its children fused one by one); None where
            not counted (a graph of an ancestor was kept instead).
    """
    path: str
    message: str
    fused_below: int | None = None

    def line(self) -> str:
        below = "" if self.fused_below is None else f" [{self.fused_below} rewrites in its children]"
        return f"{self.path}{below}: {self.message}"


@dataclass
class Report:
    """What `fuse_with_report` did.

    Attributes:
        rewrites: each rewrite applied, in order.
        skipped: each place left alone, with its reason.
        untraced: modules that could not be traced.
        notes: facts about the run (sizes an exported graph fixes, ...).
        unchecked: rewrites the self-check could not evaluate.
        faults: rewrites refused because a rule raised or proposed a wrong one (please report).
        before: counts of the original model (with example inputs: ops one forward runs).
        after: the same for the fused model.
        max_rel_error: the fused model's max relative error against the original on the
            example inputs (None without them).
    """
    rewrites: list[Rewrite] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    untraced: list[Untraced] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # rewrites the self-check could not evaluate
    faults: list[Skip] = field(default_factory=list)  # a rule raised or proposed a wrong rewrite: refused
    before: Stats | None = None
    after: Stats | None = None
    max_rel_error: float | None = None
    norms_left: list[Skip] = field(default_factory=list)  # each BN the fused model still runs, and why

    def extend(self, other: "Report"):
        """Add what `other` (the report of a part of the model) holds."""
        for name in ("rewrites", "skipped", "untraced", "notes", "unchecked", "faults"):
            getattr(self, name).extend(getattr(other, name))

    def table(self) -> str:
        return stats_table({"before": self.before, "after": self.after})

    def __str__(self) -> str:
        lines = [self.table()]
        if self.max_rel_error is not None:
            lines.append(f"max relative error: {self.max_rel_error:.3g}")
        lines += [f"note: {n}" for n in self.notes]
        if self.rewrites:
            lines.append(f"\n{len(self.rewrites)} rewrites:")
            lines += [f"  {r.rule:<17} {r.path:<40} {r.shape}  ({r.detail})" for r in self.rewrites]
        if self.skipped:
            lines.append(f"\n{len(self.skipped)} places left alone:")
            lines += [f"  {s.rule:<17} {s.path:<40} {s.reason}" for s in self.skipped]
        if self.faults:
            lines.append(f"\n{len(self.faults)} rewrites refused as rule faults (please report):")
            lines += [f"  {s.rule:<17} {s.path:<40} {s.reason}" for s in self.faults]
        if self.norms_left:
            lines.append(f"\n{len(self.norms_left)} batch norms left (the first reason for each):")
            lines += [f"  {s.path:<40} {s.reason}" for s in self.norms_left]
        if self.untraced:
            lines.append(f"\n{len(self.untraced)} modules could not be traced (their Python runs as written; "
                         "each child that traces was fused on its own):")
            lines += [f"  {u.line()}" for u in self.untraced]
        return "\n".join(lines)


def stats_table(columns: dict[str, Stats | None], extra: dict[str, list[str]] | None = None) -> str:
    """A plain-text table: one row per figure, one column per model form.

    Args:
        columns: column title → the form's Stats (None columns are left out).
        extra: more rows, title → one cell per column.

    Returns:
        The table, one line per row.
    """
    cols = {k: v for k, v in columns.items() if v is not None}
    # Stats.convs counts the matrix products of linear layers too: the label says so
    rows = [("convs + linears", lambda s: str(s.convs)), ("BNs", lambda s: str(s.bns)),
            ("params", lambda s: f"{s.params / 1e6:.3f} M" if s.params >= 100_000 else f"{s.params:,}"),
            ("GMACs", lambda s: "-" if s.macs is None else f"{s.macs / 1e9:.3f}")]
    body = [[name] + [fmt(s) for s in cols.values()] for name, fmt in rows]
    body += [[name] + vals for name, vals in (extra or {}).items()]
    head = [""] + list(cols)
    widths = [max(len(str(r[i])) for r in body + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head)] + [fmt(r) for r in body])
