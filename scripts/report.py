"""``python -m scripts.report`` from a checkout: sal_harness.report
(the side-by-side report of finished runs)."""

from sal_harness.report import main

if __name__ == "__main__":
    raise SystemExit(main())
