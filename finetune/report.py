"""A run's report: `report.md` and `report.html` (same content, opens in a browser).

Built only from the files the run wrote (resolved recipe, data report, metrics.jsonl,
eval.json, sample grids), so `write_report(run_dir)` can be re-run at any time. Curves are
drawn with PIL (no plotting dependency).
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from PIL import Image, ImageDraw

from . import atomic

PLOT_SIZE = (480, 200)
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def read_metrics(run: Path) -> list[dict]:
    file = run / "metrics.jsonl"
    rows = []
    if file.exists():
        for line in file.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def plot_series(series: dict[str, list[tuple[float, float]]], title: str, log: bool = False) -> Image.Image:
    """A line plot of named (x, y) series, with min/max labels."""
    import math

    w, h = PLOT_SIZE
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 50, w - 10, 20, h - 25
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    draw.text((left, 4), title, fill="black")
    points = [p for values in series.values() for p in values]
    if not points:
        return img
    tf = (lambda v: math.log10(max(v, 1e-12))) if log else (lambda v: v)
    xs = [p[0] for p in points]
    ys = [tf(p[1]) for p in points]
    x0, x1 = min(xs), max(xs) or 1
    y0, y1 = min(ys), max(ys)
    if y1 == y0:
        y1 = y0 + 1e-9
    if x1 == x0:
        x1 = x0 + 1
    for i, (name, values) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        xy = [(left + (x - x0) / (x1 - x0) * (right - left),
               bottom - (tf(y) - y0) / (y1 - y0) * (bottom - top)) for x, y in values]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        draw.text((right - 120, top + 4 + 12 * i), name, fill=colour)
    fmt = (lambda v: f"{10 ** v:.1e}") if log else (lambda v: f"{v:.3g}")
    draw.text((2, top), fmt(y1), fill="black")
    draw.text((2, bottom - 10), fmt(y0), fill="black")
    draw.text((left, bottom + 6), f"{x0:g}", fill="black")
    draw.text((right - 40, bottom + 6), f"{x1:g}", fill="black")
    return img


def curves(run: Path) -> list[tuple[str, Path]]:
    """Loss and LR per unit, over the run's steps; returns (title, png path)."""
    from .evaluate import save_png

    rows = read_metrics(run)
    units = list(dict.fromkeys(r["unit"] for r in rows if "unit" in r))
    made = []
    for key, log in (("loss", False), ("lr", True)):
        series = {u: [(r["step"], r[key]) for r in rows if r.get("unit") == u and key in r] for u in units}
        if any(series.values()):
            made.append((key, save_png(plot_series(series, key, log), run / "plots" / f"{key}.png")))
    return made


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows]


def eval_table(run: Path) -> list[str]:
    file = run / "eval.json"
    if not file.exists():
        return ["No evaluation in this run (recipe `eval.prompt_sets` is empty)."]
    data = json.loads(file.read_text())
    lines = []
    for name, by_variant in data["results"].items():
        by_variant = {v: by_variant[v] for v in data.get("variants", by_variant) if v in by_variant}
        attrs = [a for a in JUDGE_COLUMNS + METRIC_COLUMNS if any(a in r for r in by_variant.values())]
        rows = [[variant] + [_cell(a, r) for a in attrs] + [str(r.get("n", ""))]
                for variant, r in by_variant.items()]
        lines += [f"**{name}** (`{data['prompt_sets'][name]}`)", ""] + _table(["variant"] + attrs + ["n"], rows) + [""]
        extractors = sorted({r["extractor"] for r in by_variant.values() if "extractor" in r})
        if extractors:
            lines += [f"FID/KID features: {', '.join(extractors)} (see finetune/metrics.py: the offline"
                      " extractor's numbers compare only within this kit). val_loss_S: denoising loss of"
                      " stage S on the set's reference images, same noise for every variant.", ""]
    return lines


JUDGE_COLUMNS = ("colour", "shape", "count", "position", "overall")
METRIC_COLUMNS = ("fid", "kid", "clip_score", "val_loss_I", "val_loss_II", "val_loss_III")


def _cell(column: str, result: dict) -> str:
    if column not in result:
        return "-"
    value = result[column]
    if column in JUDGE_COLUMNS:
        return f"{value:.1%}"
    if column == "kid" and "kid_std" in result:
        return f"{value:.4f} ± {result['kid_std']:.4f}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"


def data_summary(run: Path) -> list[str]:
    file = run / "data_report.json"
    if not file.exists():
        return []
    rows = []
    for phase, rep in json.loads(file.read_text()).items():
        reasons: dict[str, int] = {}
        for item in rep.get("skipped_samples", []):
            reason = item.get("reason", "?").split(":")[0]
            reasons[reason] = reasons.get(reason, 0) + 1
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "none"
        rows.append([phase, str(rep.get("path", "")), str(rep.get("usable", "")), skipped])
    return _table(["phase", "data", "used", "skipped (reason: count)"], rows)


def write_report(run_dir: str | Path) -> Path:
    run = Path(run_dir)
    recipe = (run / "resolved_recipe.yaml").read_text() if (run / "resolved_recipe.yaml").exists() else ""
    md = [f"# Run report: {run.name}", ""]
    finished = run / "finished.json"
    if finished.exists():
        md += [f"Finished in {json.loads(finished.read_text()).get('seconds', '?')} s.", ""]
    md += ["## Evaluation", ""] + eval_table(run) + [""]
    grids = sorted((run / "samples").glob("*/*.png"), key=lambda p: (p.stem, p.parent.name != "base",
                                                                     p.parent.name))
    if grids:
        md += ["## Samples (same prompts and seeds for every variant)", ""]
        for grid in grids:
            rel = grid.relative_to(run).as_posix()
            md += [f"**{grid.parent.name} / {grid.stem}**", "", f"![{grid.parent.name} {grid.stem}]({rel})", ""]
    plots = curves(run)
    if plots:
        md += ["## Training curves", ""]
        md += [f"![{title}]({path.relative_to(run).as_posix()})" for title, path in plots] + [""]
    md += ["## Data", ""] + data_summary(run) + [""]
    md += ["## Resolved recipe", "", "```yaml", recipe.rstrip(), "```", ""]
    text = "\n".join(md)
    atomic.write_text(run / "report.md", text)
    atomic.write_text(run / "report.html", markdown_to_html(text, f"Run report: {run.name}"))
    return run / "report.md"


def markdown_to_html(text: str, title: str) -> str:
    """The small markdown subset the report uses: headings, tables, images, code, bold."""
    import re

    out, in_code, in_table = [], False, False
    for line in text.splitlines():
        if line.startswith("```"):
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        image = re.fullmatch(r"!\[(.*)\]\((.*)\)", line)
        if image:
            out.append(f'<p><img alt="{html.escape(image[1])}" src="{html.escape(image[2])}"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.strip():
            escaped = html.escape(line)
            escaped = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", escaped)
            escaped = re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)
            out.append(f"<p>{escaped}</p>")
    if in_table:
        out.append("</table>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px}img{image-rendering:pixelated;max-width:100%}"
             "pre{background:#f4f4f4;padding:1em;overflow:auto}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(out) + f"\n<script>{CHECK_IMAGES}</script>"
            "\n</body></html>\n")


# Marks images that did not load (moved or deleted files) where the reader sees them, and
# counts loaded/broken images on <body> (what the headless-browser test reads).
CHECK_IMAGES = """
window.addEventListener('load', () => {
  let ok = 0, broken = 0;
  for (const img of document.images) {
    if (img.complete && img.naturalWidth > 0) { ok++; continue; }
    broken++;
    img.insertAdjacentHTML('afterend', '<b style="color:#c00"> missing image: ' + img.getAttribute('src') + '</b>');
  }
  document.body.dataset.imagesOk = ok;
  document.body.dataset.imagesBroken = broken;
});
"""
