"""`diffscore` console entry point (the Lightning-based CLI itself lives in diffscore.lit.cli)."""

from __future__ import annotations


def main(args: list[str] | None = None) -> None:
    from diffscore.lit.cli import main as lit_main

    lit_main(args)


if __name__ == "__main__":
    main()
