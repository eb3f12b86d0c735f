"""`lab report`: one Markdown and one self-contained HTML page over any runs directory.

    lab report --root runs                 # -> runs/report.md, runs/report.html
    lab report --root runs/demo --out /tmp/demo-report

The root is walked for runs (a directory with ``_run_tracker/heartbeat.json``, as every stage and loop
writes) and for Discover→Distill pipeline roots (a directory with ``pipeline.json``; its runs belong to it).
Each run goes to its method's section, chosen by the heartbeat's stage; a method with no run says
"no runs". Per run: its figures (every PNG in the run directory; base64 in the HTML, so the page travels
alone), a table of every number in its JSON artifacts and the last line of its metrics.jsonl, and the
command that reproduces it from its config.yaml. Nothing is typed by hand: change an artifact, and the
report changes. A pipeline root shows its registry (results.md, written by phase F) and figs/.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lightning_lab.errors import ArgumentParser, UserError

# section -> (title, the heartbeat stages that belong to it). Runs of any other stage go to "stages".
SECTIONS = {
    "bon": ("Best-of-N emergence", ("bon",)),
    "rauq": ("RAUQ-CoT", ("rauq",)),
    "discover": ("Discover→Distill", ("discover",)),
    "quietstar": ("Quiet-STaR and A/B tests", ("quietstar", "ab")),
    "ace": ("ACE: evolving playbooks", ("ace",)),
    "stages": ("Training stages (pretrain, SFT, RL, SDFT)", ()),
}
# Loop commands whose subcommand is found by matching config.yaml's keys to the subcommands' config fields.
LOOP_CLIS = {"bon": "lightning_lab.bon.cli", "rauq": "lightning_lab.rauq.cli", "discover": "lightning_lab.discover.cli",
             "ace": "lightning_lab.ace.cli"}
MAX_ROWS_PER_FILE = 40  # a long JSON (per-item lists) is summarised, not dumped


@dataclass
class Run:
    """One run directory and what the report shows of it."""

    path: Path
    stage: str
    status: str
    command: str
    figures: list[Path] = field(default_factory=list)
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (artifact, key, value)
    markdown: str = ""  # a registry's own Markdown (pipeline roots)


# ---- reading the artifacts ---------------------------------------------------------------------------------


def read_json(path: Path, root: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid JSON ({error}); the report reads every number from it") from None


def scalars(value, prefix: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """The numbers, booleans and short strings of a JSON value as (dotted key, text), two levels deep."""
    if isinstance(value, bool) or value is None:
        return [(prefix, str(value))] if prefix else []
    if isinstance(value, float):
        return [(prefix, f"{value:.4g}")]
    if isinstance(value, int):
        return [(prefix, str(value))]
    if isinstance(value, str):
        return [(prefix, value)] if len(value) <= 60 else []
    if isinstance(value, dict) and depth < 3:
        return [row for key, item in value.items() for row in scalars(item, f"{prefix}.{key}" if prefix else str(key),
                                                                       depth + 1)]
    if isinstance(value, list) and value and depth < 3 and all(isinstance(v, (int, float)) for v in value):
        return [(prefix, "[" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value[:12])
                 + (", ..." if len(value) > 12 else "") + "]")]
    return []


def table_rows(run_dir: Path, root: Path) -> list[tuple[str, str, str]]:
    rows = []
    for path in sorted(run_dir.glob("*.json")):
        found = scalars(read_json(path, root))
        rows += [(path.name, key, text) for key, text in found[:MAX_ROWS_PER_FILE]]
        if len(found) > MAX_ROWS_PER_FILE:
            rows.append((path.name, "...", f"{len(found) - MAX_ROWS_PER_FILE} more values"))
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = [line for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
        if lines:
            last = json.loads(lines[-1])
            rows += [("metrics.jsonl (last line)", key, text) for key, text in scalars(last)]
    for results in ("results.jsonl", "samples.jsonl", "summary.jsonl"):
        if (run_dir / results).is_file():
            count = sum(1 for line in (run_dir / results).read_text(encoding="utf-8").splitlines() if line.strip())
            rows.append((results, "lines", str(count)))
    return rows


def loop_subcommand(stage: str, config: dict) -> str | None:
    """The subcommand whose config dataclass has every key of config.yaml and the fewest others (a run written
    before a field was added lacks it); None when no subcommand takes all its keys."""
    if stage not in LOOP_CLIS:
        return None
    fits = []
    for name, (config_class, _) in importlib.import_module(LOOP_CLIS[stage]).COMMANDS.items():
        fields = {f.name for f in dataclasses.fields(config_class)}
        if set(config) <= fields:
            fits.append((len(fields - set(config)), name))
    return min(fits)[1] if fits else None


def reproduce_command(run_dir: Path, stage: str) -> str:
    """The `lab` command that reruns this run from its own config.yaml."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return "(no config.yaml in the run directory)"
    text = config_path.read_text(encoding="utf-8")
    if text.startswith("# lightning.pytorch"):  # a LightningCLI stage
        return f"lab {stage} fit --config {config_path}"
    if stage == "ab":
        return f"lab ab --config {config_path}"
    config = yaml.safe_load(text) or {}
    subcommand = loop_subcommand(stage, config) if isinstance(config, dict) else None
    return f"lab {stage} {subcommand or '<subcommand>'} --config {config_path}"


def read_run(run_dir: Path, root: Path) -> Run:
    heartbeat = read_json(run_dir / "_run_tracker" / "heartbeat.json", root)
    stage = str(heartbeat.get("stage", "run"))
    rows = [("heartbeat.json", "status", str(heartbeat.get("status"))),
            ("heartbeat.json", "step / total", f"{heartbeat.get('step')} / {heartbeat.get('total')}")]
    return Run(run_dir, stage, str(heartbeat.get("status")), reproduce_command(run_dir, stage),
               sorted(run_dir.glob("*.png")), rows + table_rows(run_dir, root))


def read_pipeline(pipeline_dir: Path, root: Path) -> Run:
    phases = read_json(pipeline_dir / "pipeline.json", root).get("phases", {})
    rows = [("pipeline.json", f"phase {name} seconds", f"{info.get('seconds', 0):.1f}") for name, info in phases.items()]
    registry = pipeline_dir / "results.md"
    markdown = registry.read_text(encoding="utf-8") if registry.is_file() else "(no results.md yet: phase F not run)"
    # The registry's title is dropped and its sections sit under the run's heading.
    markdown = "\n".join("##" + line if line.startswith("## ") else line
                         for line in markdown.splitlines() if not line.startswith("# "))
    return Run(pipeline_dir, "pipeline", "completed" if "F" in phases else "partial",
               f"lab pipeline discover-distill --root {pipeline_dir} --resume",
               sorted((pipeline_dir / "figs").glob("*.png")), rows, markdown)


def collect(root: Path) -> dict[str, list[Run]]:
    """Every run and pipeline under `root`, by section."""
    pipelines = sorted(path.parent for path in root.rglob("pipeline.json"))
    found: dict[str, list[Run]] = {name: [] for name in SECTIONS}
    found["discover"] += [read_pipeline(path, root) for path in pipelines]
    for heartbeat in sorted(root.rglob("_run_tracker/heartbeat.json")):
        run_dir = heartbeat.parent.parent
        if any(pipeline in run_dir.parents for pipeline in pipelines):
            continue  # shown through the pipeline's registry
        run = read_run(run_dir, root)
        section = next((name for name, (_, stages) in SECTIONS.items() if run.stage in stages), "stages")
        found[section].append(run)
    return found


# ---- writing ------------------------------------------------------------------------------------------------


def markdown_report(root: Path, found: dict[str, list[Run]], out: Path) -> str:
    lines = [f"# lightning_lab report: {root}", "",
             "Every number below is read from the runs' artifacts (lightning_lab/reports/report.py).", ""]
    for name, (title, _) in SECTIONS.items():
        lines += [f"## {title}", ""]
        if not found[name]:
            lines += ["no runs", ""]
            continue
        for run in found[name]:
            lines += [f"### {run.path.relative_to(root) if run.path != root else run.path.name} ({run.status})", "",
                      "```", run.command, "```", ""]
            for figure in run.figures:
                lines += [f"![{figure.name}]({os.path.relpath(figure.resolve(), out.resolve())})", ""]
            if run.markdown:
                lines += [run.markdown.strip(), ""]
            lines += ["| artifact | key | value |", "|---|---|---|"]
            lines += [f"| {a} | {k} | {v.replace('|', '/')} |" for a, k, v in run.rows]
            lines.append("")
    return "\n".join(lines)


def html_report(root: Path, found: dict[str, list[Run]]) -> str:
    escape = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             f"<title>lightning_lab report: {escape(str(root))}</title><style>",
             "body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}",
             "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:2px 6px}",
             "pre{background:#f4f4f4;padding:6px;overflow-x:auto}img{max-width:100%}",
             ".none{color:#888}</style></head><body>",
             f"<h1>lightning_lab report: {escape(str(root))}</h1>",
             "<p>Every number below is read from the runs' artifacts.</p>"]
    for name, (title, _) in SECTIONS.items():
        parts.append(f"<h2>{escape(title)}</h2>")
        if not found[name]:
            parts.append("<p class='none'>no runs</p>")
            continue
        for run in found[name]:
            label = run.path.relative_to(root) if run.path != root else run.path.name
            parts += [f"<h3>{escape(str(label))} ({escape(run.status)})</h3>", f"<pre>{escape(run.command)}</pre>"]
            for figure in run.figures:
                data = base64.b64encode(figure.read_bytes()).decode("ascii")
                parts.append(f"<figure><img alt='{escape(figure.name)}' src='data:image/png;base64,{data}'>"
                             f"<figcaption>{escape(figure.name)}</figcaption></figure>")
            if run.markdown:
                parts.append(markdown_tables_to_html(run.markdown))
            parts.append("<table><tr><th>artifact</th><th>key</th><th>value</th></tr>")
            parts += [f"<tr><td>{escape(a)}</td><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for a, k, v in run.rows]
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def markdown_tables_to_html(markdown: str) -> str:
    """The registry's Markdown (headings, paragraphs, pipe tables) as HTML, enough for results.md."""
    out, in_table = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if all(set(cell) <= set("-: ") for cell in cells):
                continue  # the header separator
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("#"):
            out.append(f"<h4>{html.escape(line.lstrip('#').strip())}</h4>")
        elif line.strip() and not line.startswith("!["):
            out.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        out.append("</table>")
    return "\n".join(out)


def write_report(root: str | Path, out: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``<out>/report.md`` and ``<out>/report.html`` (out defaults to the root); returns both paths."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--root: {root} is not a directory")
    out = Path(out) if out is not None else root
    out.mkdir(parents=True, exist_ok=True)
    found = collect(root)
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(markdown_report(root, found, out), encoding="utf-8")
    html_path.write_text(html_report(root, found), encoding="utf-8")
    return md_path, html_path


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="lab report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs", help="the runs directory to walk")
    parser.add_argument("--out", default=None, help="where report.md and report.html go (default: the root)")
    args = parser.parse_args(argv)
    md_path, html_path = write_report(args.root, args.out)
    print(f"report: {md_path}  {html_path}")
    return 0
