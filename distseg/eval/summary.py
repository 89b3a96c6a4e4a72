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
    seeds; then one line per further metric the protocol registers as `summary` (position: cos_gap),
    and one line of its `reference` metrics (position: what the one-hot labels read)."""
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
        reference = _reference(protocol, results)
        if reference:
            lines.append(reference)
    return lines


def _reference(protocol: str, results: dict) -> str | None:
    """The metrics protocol registers as `reference` (the same for every source: position's one-hot
    labels), printed once from the first source that has them."""
    from distseg.eval.protocols import PROTOCOLS

    keys = list(PROTOCOLS.meta(protocol).get("reference") or ()) if protocol in PROTOCOLS else []
    for res in results["sources"].values():
        values = [(k, res["metrics"].get(f"{protocol}/{k}")) for k in keys]
        if keys and all(v is not None for _, v in values):
            return f"{protocol}: labels alone (reference) " + ", ".join(f"{k} {v['mean']:.3f}" for k, v in values)
    return None
