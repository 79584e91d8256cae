"""Side-by-side comparison of two registered model versions (terminal table + self-contained HTML).

Everything comes from the registry: the version's tags (strategy, source, data hash, validation
status), its aliases, and its run's ``evaluation/report.json`` and
``evaluation/confusion_matrix.png`` (logged by the register step).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlops.errors import TlopsError
from tlops.tracking import registry

log = logging.getLogger(__name__)
REPORT, CONFUSION = "evaluation/report.json", "evaluation/confusion_matrix.png"


@dataclass
class VersionInfo:
    name: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    run_id: str | None
    report: dict[str, Any] | None = None
    confusion_png: bytes | None = None
    missing: list[str] = field(default_factory=list)

    def metric(self, key: str) -> float | None:
        return (self.report or {}).get("metrics", {}).get(key)


def load_version(name: str, version: str) -> VersionInfo:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mv = registry.client().get_model_version(name, str(version))
    except MlflowException as e:
        raise TlopsError(f"cannot compare {name} version {version}: {e.message}") from None
    info = VersionInfo(name, str(mv.version), sorted(mv.aliases or []), dict(mv.tags), mv.run_id)
    if not mv.run_id:
        info.missing = [REPORT, CONFUSION]
        return info
    with tempfile.TemporaryDirectory() as tmp:
        for path in (REPORT, CONFUSION):
            try:
                local = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=path, dst_path=tmp))
            except (MlflowException, OSError) as e:
                log.warning("compare: %s v%s: no %s in run %s (%s)", name, info.version, path, mv.run_id, e)
                info.missing.append(path)
                continue
            if path == REPORT:
                info.report = json.loads(local.read_text())
            else:
                info.confusion_png = local.read_bytes()
    return info


def _num(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def rows(a: VersionInfo, b: VersionInfo) -> list[tuple[str, str, str, str]]:
    """(field, version a, version b, change b - a) for every compared field."""
    out: list[tuple[str, str, str, str]] = []
    for label, key, signed in (
        ("test accuracy", "accuracy", False),
        ("macro-F1", "macro_f1", False),
        ("ECE (lower is better)", "ece", False),
        ("gain over from-scratch", "gain_over_scratch", True),
    ):
        va, vb = a.metric(key), b.metric(key)
        delta = _num(vb - va, signed=True) if va is not None and vb is not None else ""
        out.append((label, _num(va, signed), _num(vb, signed), delta))
    for label, fn in (
        ("test samples", lambda v: str((v.report or {}).get("test_size", "n/a"))),
        ("strategy", lambda v: v.tags.get("tlops.strategy", "n/a")),
        ("source model", lambda v: v.tags.get("tlops.source_model", "n/a")),
        ("source digest", lambda v: v.tags.get("tlops.source_digest", "n/a")[:16]),
        ("data hash", lambda v: v.tags.get("tlops.data_hash", "n/a")[:16]),
        ("validation status", lambda v: v.tags.get(registry.VALIDATION_TAG, "n/a")),
        ("aliases", lambda v: ", ".join(v.aliases) or "-"),
        ("run", lambda v: v.run_id or "n/a"),
    ):
        va, vb = fn(a), fn(b)
        out.append((label, va, vb, "same" if va == vb else "differs"))
    return out


def same_split(a: VersionInfo, b: VersionInfo) -> bool:
    ha, hb = a.tags.get("tlops.data_hash"), b.tags.get("tlops.data_hash")
    return bool(ha) and ha == hb


def render_text(a: VersionInfo, b: VersionInfo) -> str:
    table = [("", f"v{a.version}", f"v{b.version}", "change")] + rows(a, b)
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    lines = [f"{a.name}: v{a.version} vs v{b.version}"]
    for i, r in enumerate(table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(
        "same data: metrics are on the same test split"
        if same_split(a, b)
        else "different data hashes: the metrics are not on the same test split"
    )
    return "\n".join(lines)


def render_html(a: VersionInfo, b: VersionInfo) -> str:
    e = html.escape
    head = f"<tr><th></th><th>v{e(a.version)}</th><th>v{e(b.version)}</th><th>change</th></tr>"
    body = "\n".join(
        f"<tr><th>{e(r[0])}</th><td>{e(r[1])}</td><td>{e(r[2])}</td><td>{e(r[3])}</td></tr>" for r in rows(a, b)
    )

    def figure(v: VersionInfo) -> str:
        if v.confusion_png is None:
            return (
                f"<figure><figcaption>v{e(v.version)}</figcaption><p>no {CONFUSION} in this version's run</p></figure>"
            )
        data = base64.b64encode(v.confusion_png).decode("ascii")
        return (
            f'<figure><img alt="confusion matrix v{e(v.version)}" src="data:image/png;base64,{data}">'
            f"<figcaption>v{e(v.version)}: confusion matrix ({e(v.tags.get('tlops.strategy', ''))})"
            "</figcaption></figure>"
        )

    split = (
        "same data: metrics are on the same test split"
        if same_split(a, b)
        else "different data hashes: the metrics are not on the same test split"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(a.name)}: v{e(a.version)} vs v{e(b.version)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:.3em .7em;text-align:left}} td{{font-family:monospace}}
.figs{{display:flex;gap:2em;flex-wrap:wrap}} img{{max-width:480px}}
</style></head><body>
<h1>{e(a.name)}: v{e(a.version)} vs v{e(b.version)}</h1>
<p>{e(split)}</p>
<table>{head}
{body}
</table>
<h2>Confusion matrices (selected model, test split)</h2>
<div class="figs">{figure(a)}{figure(b)}</div>
</body></html>
"""


def compare(name: str, version_a: str, version_b: str, out: Path) -> tuple[str, Path]:
    """Load both versions, write the HTML report to ``out``; return (text table, html path)."""
    a, b = load_version(name, version_a), load_version(name, version_b)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(a, b))
    return render_text(a, b), out
