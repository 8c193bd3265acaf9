"""The server's API reference as one self-contained HTML page, made from its OpenAPI schema.

FastAPI's interactive docs load their script and styles from a CDN: offline they show nothing,
and opening them would tell a third party that Menny runs here. This page needs no network and
no script; the machine-readable schema stays at /openapi.json.
"""

from __future__ import annotations

import html
import json
from typing import Any

STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #1d1d2b; }
h2 { margin-top: 2rem; font-family: ui-monospace, monospace; font-size: 1.05rem; }
.method { display: inline-block; min-width: 4.5rem; color: #fff; background: #4b3fd1; border-radius: 0.3rem;
  text-align: center; margin-right: 0.5rem; }
table { border-collapse: collapse; margin: 0.5rem 0; }
td, th { border: 1px solid #ddd; padding: 0.2rem 0.6rem; text-align: left; vertical-align: top; }
code, pre { font-family: ui-monospace, monospace; font-size: 0.85rem; }
pre { background: #f4f4f8; padding: 0.5rem; overflow-x: auto; }
"""


def _schema_name(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_schema_name(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list[{_schema_name(schema.get('items', {}))}]"
    return schema.get("type", "any")


def _operation(path: str, method: str, op: dict[str, Any]) -> str:
    parts = [
        f'<h2><span class="method">{method.upper()}</span>{html.escape(path)}</h2>',
        f"<p>{html.escape(op.get('description') or op.get('summary') or '')}</p>",
    ]
    if params := op.get("parameters"):
        rows = "".join(
            f"<tr><td><code>{html.escape(p['name'])}</code></td><td>{p['in']}</td>"
            f"<td>{html.escape(_schema_name(p.get('schema', {})))}</td>"
            f"<td>{'required' if p.get('required') else 'optional'}</td></tr>"
            for p in params
        )
        parts.append(f"<table><tr><th>parameter</th><th>in</th><th>type</th><th></th></tr>{rows}</table>")
    if body := op.get("requestBody"):
        schema = body.get("content", {}).get("application/json", {}).get("schema", {})
        parts.append(f"<p>Body (JSON): <code>{html.escape(_schema_name(schema))}</code></p>")
    rows = []
    for code, response in op.get("responses", {}).items():
        content = response.get("content", {})
        kind = ", ".join(
            _schema_name(c.get("schema", {})) if media == "application/json" else media for media, c in content.items()
        )
        rows.append(
            f"<tr><td>{code}</td><td>{html.escape(response.get('description', ''))}</td>"
            f"<td><code>{html.escape(kind)}</code></td></tr>"
        )
    parts.append(f"<table><tr><th>status</th><th>meaning</th><th>content</th></tr>{''.join(rows)}</table>")
    return "".join(parts)


def docs_html(openapi: dict[str, Any]) -> str:
    """The reference: every operation with its parameters and answers, then the data models."""
    info = openapi.get("info", {})
    operations = "".join(
        _operation(path, method, op)
        for path, methods in openapi.get("paths", {}).items()
        for method, op in methods.items()
    )
    models = "".join(
        f"<h2>{html.escape(name)}</h2><pre>{html.escape(json.dumps(schema, indent=2))}</pre>"
        for name, schema in openapi.get("components", {}).get("schemas", {}).items()
    )
    title = html.escape(info.get("title", ""))
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{STYLE}</style></head><body><h1>{title}</h1>"
        f"<p>{html.escape(info.get('summary', ''))} The schema itself: <a href=\"/openapi.json\">/openapi.json</a>. "
        "Errors are JSON <code>{\"detail\": \"what went wrong and what to do\"}</code>.</p>"
        f"{operations}<h1>Models</h1>{models}</body></html>"
    )
