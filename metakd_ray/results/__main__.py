"""``python -m metakd_ray.results RUN_DIR [--json | --csv]``: the report of a sweep (see ``results.report.main``).

A damaged record of the sweep (:class:`~metakd_ray.results.load.ResultsError`) is one ``error:`` line on stderr and
exit status 2, nothing written."""

import sys

from metakd_ray.results.load import ResultsError
from metakd_ray.results.report import main as report_main


def main(argv: list[str] | None = None) -> int:
    try:
        return report_main(argv)
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
