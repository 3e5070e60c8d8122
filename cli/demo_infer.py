"""Checkout entry point: ``python -m cli.demo_infer`` runs sal_harness.demo (installed as ``sal-demo``)."""

from sal_harness.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
