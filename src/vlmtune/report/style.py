"""The report's stylesheet: system fonts only (no web font to fetch), a two-column grid
of figures on a wide screen, one on a narrow one or on paper."""

CSS = """
:root { color-scheme: light; --ink: #1f2937; --muted: #6b7280; --line: #e5e7eb;
  --right: #047857; --wrong: #b91c1c; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--ink); margin: 0 auto; padding: 24px 28px 40px; max-width: 1400px; }
h1 { font-size: 24px; margin: 0 0 12px; }
h2 { font-size: 18px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 8px; }
h4 { font-size: 14px; margin: 14px 0 8px; }
code { font: 12.5px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  background: #f3f4f6; padding: 1px 4px; border-radius: 3px; overflow-wrap: anywhere; }
.facts { display: flex; flex-wrap: wrap; gap: 8px 28px; }
.fact .label, .label { color: var(--muted); font-size: 12px; }
.fact { min-width: 90px; max-width: 100%; }
.status { font-weight: 600; padding: 1px 8px; border-radius: 10px; background: #e5e7eb; }
.status.finished, .status.succeeded { background: #d1fae5; color: #065f46; }
.status.running, .status.queued { background: #dbeafe; color: #1e40af; }
.status.stopped, .status.failed, .status.cancelled { background: #fee2e2; color: #991b1b; }
.note { color: var(--muted); margin: 4px 0 10px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 18px 28px; }
figure { margin: 0; break-inside: avoid; }
figcaption { margin-bottom: 4px; max-width: 640px; }
svg.plot { max-width: 100%; height: auto; display: block; }
svg.plot text { font: 11px system-ui, sans-serif; fill: #4b5563; }
svg.plot .gridline { stroke: #eef0f3; }
svg.plot .axis { stroke: #9ca3af; }
svg.plot .axis-label { fill: #374151; }
svg.plot .legend { fill: #1f2937; }
svg.plot circle.pt:hover { fill: currentColor; stroke: #111827; }
table { border-collapse: collapse; margin: 6px 0 12px; }
td, th { border-bottom: 1px solid var(--line); padding: 3px 10px 3px 0; text-align: left;
  vertical-align: top; }
th { color: var(--muted); font-weight: 500; font-size: 12px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; padding-left: 12px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; }
.card { border: 1px solid var(--line); border-left: 4px solid; border-radius: 6px;
  padding: 8px; break-inside: avoid; }
.card.right { border-left-color: var(--right); }
.card.wrong { border-left-color: var(--wrong); }
.card img { display: block; width: 96px; height: 96px; object-fit: contain;
  image-rendering: pixelated; background: #f9fafb; margin-bottom: 6px; }
.card .meta { color: var(--muted); font-size: 11px; }
.card .prompt { display: -webkit-box; -webkit-line-clamp: 3; -webkit-box-orient: vertical;
  overflow: hidden; font-size: 12.5px; margin: 2px 0 4px; }
code.right { color: var(--right); font-weight: 600; }
code.wrong { color: var(--wrong); font-weight: 600; }
.predictions.wrong h4 { color: var(--wrong); }
.predictions.right h4 { color: var(--right); }
details { margin: 6px 0; } summary { color: var(--muted); cursor: pointer; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
@media print {
  body { padding: 0; max-width: none; }
  .grid { grid-template-columns: 1fr 1fr; }
  svg.plot { width: 100%; }
  h2 { break-after: avoid; }
}
@media (max-width: 700px) { .grid { grid-template-columns: 1fr; } }
"""
