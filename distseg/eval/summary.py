"""The lines `distseg evaluate` and `distseg demo` print: each protocol's headline number per source,
then each diagnostic's (the position leak), with the further metrics a protocol registers as `summary`."""

from __future__ import annotations


def _line(protocol: str, key: str, results: dict) -> str | None:
    parts = []
    for source, res in results["sources"].items():
        value = res["metrics"].get(f"{protocol}/{key}")
        if value is not None:
            parts.append(
                f"{source} {value['mean']:.3f}" + (f" +- {value['std']:.3f}" if len(value["values"]) > 1 else "")
            )
    return f"{protocol}: {key} " + ", ".join(parts) if parts else None


def summary_lines(results: dict) -> list[str]:
    """One line per protocol and diagnostic: its headline metric for every source, mean +- std over
    seeds; then one line per further metric the protocol registers as `summary` (position: cos_gap)."""
    from distseg.eval.evaluate import headline
    from distseg.eval.protocols import PROTOCOLS

    lines = []
    for protocol in [*results["protocols"], *results.get("diagnostics", [])]:
        key = headline(protocol, {})[0]
        extra = list(PROTOCOLS.meta(protocol).get("summary") or ()) if protocol in PROTOCOLS else []
        for metric in [key, *extra]:
            line = _line(protocol, metric, results)
            if line is not None:
                lines.append(line)
    return lines
