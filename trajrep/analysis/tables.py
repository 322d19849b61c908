"""The results table as Markdown (with the code revision of its records), CSV and LaTeX."""

import csv
from collections import Counter
from pathlib import Path

from trajrep.analysis.collect import CHOSEN, ROW_FIELDS, columns, differences


def _cell(value: tuple | None) -> str:
    """mean ± std in percent; a single seed has no spread to show."""
    if value is None:
        return ""
    return f"{100 * value[0]:.2f}" + (f" ± {100 * value[1]:.2f}" if value[2] > 1 else "")


def _difference(value: tuple | None) -> str:
    """mean difference ± 95 % half-width in percent; one seed says it has no interval."""
    if value is None:
        return ""
    return f"{100 * value[0]:+.2f}" + (" (n = 1, no interval)" if value[1] is None else f" ± {100 * value[1]:.2f}")


def _filled(rows: list[dict]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """The probe columns and the differences that some row fills (the tables leave the others out)."""
    return ([probe for probe in columns() if any(row[probe] for row in rows)],
            [difference for difference in differences() if any(row[difference[2]] for row in rows)])


def text_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the columns some row fills."""
    probes, filled = _filled(rows)
    labels = [label for _, _, label in filled]
    chosen = [CHOSEN] if any(row["chosen"] for row in rows) else []
    header = [*ROW_FIELDS, *chosen, *(columns()[p] for p in probes), *labels, "CKA across t"]
    body = [[str(row[f]) for f in ROW_FIELDS] + [row["chosen"] for _ in chosen] + [_cell(row[p]) for p in probes]
            + [_difference(row[label]) for label in labels]
            + ["" if row["cka"] is None else f"{row['cka']:.3f}"] for row in rows]
    return header, body


def revision_note(revisions: Counter) -> str:
    """Which code wrote the records: one revision, or a warning naming each with its count of result files (a table
    of several revisions mixes code that may have changed between them)."""
    named = {revision or "unknown (not a git checkout)": count for revision, count in revisions.most_common()}
    if not named:
        return "No result files yet."
    if len(named) == 1:
        return f"Every record comes from code revision {next(iter(named))}."
    files = [f"{revision} ({count} result file{'s' if count > 1 else ''})" for revision, count in named.items()]
    return f"Warning: the records come from {len(named)} code revisions: {', '.join(files)}."


def write_tables(rows: list[dict], out: Path, revisions: Counter) -> None:
    """table.md (with the code revision of its records), table.csv (numbers unrounded) and table.tex, each with the
    columns some row fills."""
    header, body = text_table(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    probes, filled = _filled(rows)
    seeds = sorted({row[p][2] for row in rows for p in probes if row[p]})
    note = (f"Test accuracy (%), mean ± std over pretraining seeds (n = {', '.join(map(str, seeds))}); "
            "differences with a 95 % t-interval over paired seeds. CKA across t: mean linear CKA between the "
            "test representations at every two times of the grid (1 = the same representation at every t).")
    warnings = [f"- {' / '.join(str(row[f]) for f in ROW_FIELDS)}: {', '.join(row['warnings'])}" for row in rows
                if row["warnings"]]
    if warnings:
        lines += ["", "Warning: not converged, so these cells are not yet results (train longer, or widen the lr "
                  "grid):", *warnings]
    left_out = [f"- {' / '.join(str(row[f]) for f in ROW_FIELDS)}: "
                + ", ".join(f"{columns()[probe]} ({count} seed{'s' if count > 1 else ''})"
                            for probe, count in row["left_out"].items()) for row in rows if row["left_out"]]
    if left_out:
        lines += ["", "Left out: replicated controls of a t that is not the row's best t (a preset replicates its "
                  "first task's best t for every task; or the MLP record was redone since), so they control "
                  "nothing here:", *left_out]
    (out / "table.md").write_text("\n".join([note, "", revision_note(revisions), "", *lines]) + "\n")
    with open(out / "table.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*ROW_FIELDS, "mlp_layer_t", *(f"{p}_{s}" for p in probes for s in ("mean", "std", "seeds")),
                         *(f"{c}_minus_{b}_{s}" for c, b, _ in filled for s in ("mean", "ci95")), "cka_mean"])
        for row in rows:
            writer.writerow([row[f] for f in ROW_FIELDS] + [row["chosen"]]
                            + ["" if v is None else v for p in probes for v in (row[p] or ("", "", ""))]
                            + ["" if v is None else v for _, _, label in filled for v in (row[label] or ("", ""))]
                            + ["" if row["cka"] is None else row["cka"]])
    escape = str.maketrans({"_": r"\_", "%": r"\%", "±": r"$\pm$"})
    tex = [r"\begin{tabular}{" + "l" * len(ROW_FIELDS) + "r" * (len(header) - len(ROW_FIELDS)) + "}", r"\hline",
           " & ".join(h.translate(escape) for h in header) + r" \\", r"\hline"]
    tex += [" & ".join(c.translate(escape) for c in cells) + r" \\" for cells in body]
    (out / "table.tex").write_text("\n".join([*tex, r"\hline", r"\end{tabular}"]) + "\n")
