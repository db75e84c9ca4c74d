"""One Markdown + HTML report of a run: evaluation metrics, loss and kNN curves, embedding map, config.

Reads what the run and `python -m pipeline.eval ...` already wrote (metrics.jsonl, config.yaml, the
eval folder's `*.json` results and `*.png` maps), so it can be rebuilt at any time without a GPU.
The HTML inlines its images so it is a single file to share.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_results(eval_dir: Path) -> list[dict[str, Any]]:
    """Every `*.json` result the eval commands wrote (each has "protocol" and "top1"), sorted by name."""
    results = []
    for path in sorted(Path(eval_dir).glob("*.json")):
        row = json.loads(path.read_text())
        if isinstance(row, dict) and "protocol" in row and "top1" in row:
            results.append(row)
    return results


def _plot_curves(rows: list[dict[str, Any]], out_png: Path) -> Path | None:
    """Training loss per logged step and online kNN top-1 per epoch, side by side; None without data."""
    loss = [
        (r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])
    ]
    knn = [(r["epoch"] + 1, r["knn_top1"]) for r in rows if "knn_top1" in r]
    if not loss and not knn:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), dpi=100)
    if loss:
        axes[0].plot(*zip(*loss, strict=True), lw=1)
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    if knn:
        axes[1].plot(*zip(*knn, strict=True), marker="o")
    axes[1].set(title="online kNN top-1 (val)", xlabel="epoch", ylabel="top-1")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, int | float) else "–"


def _table(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = [["protocol", "backbone", "top-1", "top-5", "details"]]
    for r in results:
        details = ", ".join(f"{k}={v}" for k, v in r.get("details", {}).items())
        rows.append(
            [r["protocol"], r.get("backbone", "pretrained"), _pct(r["top1"]), _pct(r.get("top5")), details]
        )
    return rows


def _summary(rows: list[dict[str, Any]]) -> list[str]:
    steps = [r for r in rows if "loss" in r]
    if not steps:
        return ["No training metrics found."]
    last = steps[-1]
    lines = [
        f"{len(steps)} steps logged; last step {last['step']}, epoch {last['epoch']}, loss {last['loss']:.4f}"
    ]
    knn = [r["knn_top1"] for r in rows if "knn_top1" in r]
    if knn:
        lines.append(f"online kNN top-1: first {_pct(knn[0])}, last {_pct(knn[-1])}, best {_pct(max(knn))}")
    return lines


def write_report(run_dir: str | Path, eval_dir: str | Path, *, title: str | None = None) -> tuple[Path, Path]:
    """Write `eval_dir/report.md` and `eval_dir/report.html`; returns both paths."""
    run_dir, eval_dir = Path(run_dir), Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    rows = read_metrics(run_dir)
    results = read_results(eval_dir)
    curves = _plot_curves(rows, eval_dir / "curves.png")
    maps = sorted(eval_dir.glob("embedding_map*.png"))
    config_path = run_dir / CONFIG_FILE
    config_text = config_path.read_text() if config_path.exists() else "(no config.yaml in the run folder)"
    title = title or f"Run report: {run_dir.name}"
    table = _table(results)
    images = [("Loss and kNN curves", curves)] if curves else []
    images += [(f"Embedding map ({p.stem})", p) for p in maps]

    md = [f"# {title}", "", f"Run folder: `{run_dir}`", "", "## Evaluation", ""]
    if len(table) > 1:
        md += ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
        md += ["| " + " | ".join(r) + " |" for r in table[1:]]
    else:
        md.append("No evaluation results yet (run `python -m pipeline.eval knn|linear|finetune ...`).")
    md += ["", "## Training", "", *[f"- {line}" for line in _summary(rows)], ""]
    for caption, path in images:
        md += [f"### {caption}", "", f"![{caption}]({path.name})", ""]
    md += ["## Config", "", "```yaml", config_text.rstrip(), "```", ""]
    md_path = eval_dir / "report.md"
    md_path.write_text("\n".join(md))

    def cell(tag: str, text: str) -> str:
        return f"<{tag}>{html.escape(text)}</{tag}>"

    body = [f"<h1>{html.escape(title)}</h1>", f"<p>Run folder: <code>{html.escape(str(run_dir))}</code></p>"]
    body.append("<h2>Evaluation</h2>")
    if len(table) > 1:
        body.append("<table><tr>" + "".join(cell("th", h) for h in table[0]) + "</tr>")
        body += ["<tr>" + "".join(cell("td", c) for c in r) + "</tr>" for r in table[1:]]
        body.append("</table>")
    else:
        body.append("<p>No evaluation results yet.</p>")
    body += ["<h2>Training</h2>", "<ul>", *[cell("li", line) for line in _summary(rows)], "</ul>"]
    for caption, path in images:
        data = base64.b64encode(path.read_bytes()).decode()
        body += [
            cell("h3", caption),
            f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">',
        ]
    body += ["<h2>Config</h2>", cell("pre", config_text)]
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3em .6em}img{max-width:100%}pre{background:#f6f6f6;padding:1em}"
    )
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>\n"
    )
    html_path = eval_dir / "report.html"
    html_path.write_text(page)
    return md_path, html_path
