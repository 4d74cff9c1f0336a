"""report.md: one section per experiment with its checks table and figures; the checks as a run prints them."""

import os

from jaxicl import outputs


def _fmt(value) -> str:
    """A table cell: floats to 4 digits; a '|' (notes write |x| and ||C||) escaped so it does not end the cell."""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def print_checks(result: dict, out: str) -> None:
    """Prints a finished experiment's checks (pass/FAIL, value, target), its wall time and where its result is."""
    for c in result["checks"]:
        print(f"   [{'pass' if c['passed'] else 'FAIL'}] {c['name']} = {c['value']} (target {c['target']})")
    print(f"   {result['wall_seconds']:.0f} s -> {out}/{result['experiment']}/result.json", flush=True)


def write_report(out: str, preset: str, results: list[dict], errors: dict[str, str],
                 jobs: int = 1) -> str:
    """Writes out/report.md from result dicts (and experiments that raised), run `jobs` at a time; returns its path."""
    n_checks = sum(len(r["checks"]) for r in results)
    n_passed = sum(c["passed"] for r in results for c in r["checks"])
    overlap = f" They ran {jobs} at a time (--jobs), so their wall times overlap." if jobs > 1 else ""
    lines = [f"# jaxicl reproduction report (preset `{preset}`)", "",
             f"{len(results)} experiments ran, {len(errors)} raised; {n_passed}/{n_checks} checks passed.{overlap}",
             "",
             "| experiment | checks passed | wall time (s) |", "|---|---|---|"]
    for r in results:
        passed = sum(c["passed"] for c in r["checks"])
        lines.append(f"| [{r['experiment']}](#{r['experiment']}) | {passed}/{len(r['checks'])} | {r['wall_seconds']:.0f} |")
    for name in errors:
        lines.append(f"| {name} | raised | - |")
    for r in results:
        lines += ["", f"## {r['experiment']}", "", "| check | value | target | passed | note |", "|---|---|---|---|---|"]
        for c in r["checks"]:
            mark = "yes" if c["passed"] else "**NO**"
            cells = (_fmt(c["name"]), _fmt(c["value"]), _fmt(c["target"]), mark, _fmt(c["note"]))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += [f"![{fig}]({r['experiment']}/{fig})" for fig in r["figures"]]
    for name, err in errors.items():
        lines += ["", f"## {name}", "", "The experiment raised:", "", "```", err, "```"]
    path = os.path.join(out, "report.md")
    outputs.write_text(path, "\n".join(lines) + "\n")
    return path
