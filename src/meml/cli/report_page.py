"""The HTML page of `meml report`: one self-contained file that embeds every plot (base64),
a table of each run's final figures, the commands that made each run, and sample
completions."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from meml.cli.report_runs import Plot, Run, equivalent_command


def _text(value) -> str:
    """Escaped for HTML, without the control characters a random model can emit."""
    return html.escape(re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", str(value)))


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else "" if v is None else str(v)


def final_figures(run: Run, window: int = 10) -> dict[str, object]:
    """The figures of one run's final-figures table."""
    row: dict[str, object] = {
        "SFT steps": len(run.series("sft", "loss")[0]),
        "RL steps": len(run.series("rl", "loss")[0]),
    }
    for key in ("reward/mean", "zero_signal_frac", "completion_len", "tokens_per_s"):
        values = run.series("rl", key)[1][-window:]
        if values:
            row[f"{key} (last {len(values)} steps)"] = sum(values) / len(values)
    evaluation = run.last("eval")
    if evaluation:
        row["eval"] = f"{evaluation.get('tag')} (step {evaluation.get('step')})"
        for k in [f"acc/{e}" for e in run.experts] + ["acc/best", "acc/any", "acc/majority", "coverage/gain"]:
            if k in evaluation:
                row[k] = evaluation[k]
        if "best_expert" in evaluation:
            row["best expert"] = evaluation["best_expert"]
    return row


def _table(runs: list[Run]) -> str:
    rows = [final_figures(run) for run in runs]
    keys = list(dict.fromkeys(k for row in sorted(rows, key=len, reverse=True) for k in row))  # the fullest row's order
    head = "".join(f"<th>{_text(run.name)}</th>" for run in runs)
    body = "".join(
        f"<tr><th>{_text(k)}</th>" + "".join(f"<td>{_text(_fmt(row.get(k)))}</td>" for row in rows) + "</tr>"
        for k in keys
    )
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def _commands(run: Run) -> str:
    recorded = "".join(f"<pre>{_text(c)}</pre>" for c in run.commands) or "<p>(no command.txt in this run)</p>"
    try:
        rebuilt = f"<pre>{_text(equivalent_command(run.config))}</pre>" if run.config else "<p>(no config.yaml)</p>"
    except Exception as exc:  # an old or foreign config: show why instead of failing the report
        rebuilt = f"<p>(config.yaml could not be read back: {_text(exc)})</p>"
    return (
        f"<h3>{_text(run.name)} <small>{_text(run.path)}</small></h3><p>as run (command.txt):</p>{recorded}"
        f"<p>equivalent command, from config.yaml:</p>{rebuilt}"
    )


def _samples(run: Run, limit: int = 6) -> str:
    if not run.samples:
        return ""
    last = max(s.get("step", 0) for s in run.samples)
    items = [s for s in run.samples if s.get("step", 0) == last][:limit]
    rows = "".join(
        f"<tr><td>{_text(s.get('expert'))}</td><td>{_text(s.get('reward'))}</td><td><pre>{_text(s.get('completion'))}</pre></td></tr>"
        for s in items
    )
    head = "<tr><th>expert</th><th>reward</th><th>completion</th></tr>"
    return f"<h2>Sample completions, step {last}</h2><table>{head}{rows}</table>"


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
pre{white-space:pre-wrap;margin:2px 0;font-size:12px}
figure{margin:1.5em 0}img{max-width:100%}figcaption{font-size:13px;color:#444}"""
# Marks the page once loaded: <body data-images-loaded="shown/total">; a broken image is easy to spot.
CHECK = """window.addEventListener("load",function(){var i=document.images,n=0;for(var k=0;k<i.length;k++)
{if(i[k].complete&&i[k].naturalWidth>0){n++}else{i[k].alt="missing image: "+i[k].dataset.file}}
document.body.dataset.imagesLoaded=n+"/"+i.length;});"""


def write_page(runs: list[Run], plots: list[Plot], out: Path, title: str) -> Path:
    figures = []
    for p in plots:
        data = base64.b64encode((out / p.file).read_bytes()).decode()
        figures.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{_text(p.title)}" data-file="{_text(p.file)}">'
            f'<figcaption><a href="{_text(p.file)}">{_text(p.file)}</a>: {_text(p.title)}</figcaption></figure>'
        )
    page = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{_text(title)}</title><style>{STYLE}</style>'
        f"<script>{CHECK}</script></head><body><h1>{_text(title)}</h1><h2>Final figures</h2>{_table(runs)}"
        f"<h2>Commands</h2>{''.join(_commands(r) for r in runs)}<h2>Plots</h2>{''.join(figures)}"
        f"{''.join(_samples(r) for r in runs) if len(runs) == 1 else ''}</body></html>"
    )
    path = out / "index.html"
    path.write_text(page)
    return path
