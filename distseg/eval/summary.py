"""The lines `distseg evaluate` and `distseg demo` print: each protocol's headline number per source."""

from __future__ import annotations


def summary_lines(results: dict) -> list[str]:
    """One line per protocol: its headline metric for every source, mean +- std over seeds."""
    from distseg.eval.evaluate import headline

    lines = []
    for protocol in results["protocols"]:
        parts = []
        for source, res in results["sources"].items():
            key, value = headline(protocol, res["metrics"])
            if value is not None:
                parts.append(
                    f"{source} {value['mean']:.3f}" + (f" +- {value['std']:.3f}" if len(value["values"]) > 1 else "")
                )
        if parts:
            lines.append(f"{protocol}: {key} " + ", ".join(parts))
    return lines
