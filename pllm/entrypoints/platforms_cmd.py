"""``pllm platforms``: every discovered platform with its origin, API version,
detection score and reason, the one ``--device`` selects marked ``*``;
``--check NAME`` runs the shipped conformance suite against platform NAME.

Exit status: 0 when selection (and the check) succeed; 1 when selection
fails; with ``--check``, pytest's exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from pllm.plugins.errors import PluginError
from pllm.plugins.manager import AUTO, PluginManager

_HEADER = ("", "NAME", "ORIGIN", "API", "SCORE", "REASON")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default=AUTO,
        help="platform to mark as selected (default: auto, the highest score)",
    )
    parser.add_argument(
        "--check",
        metavar="NAME",
        default=None,
        help="run the platform conformance suite against platform NAME and exit with its status",
    )


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``platforms`` subcommand; ``args.func(args)`` runs it."""
    parser = subparsers.add_parser(
        "platforms",
        help="list hardware platforms, their detection and the selected one",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    manager = PluginManager()
    try:
        entries = manager.platforms()
    except PluginError as exc:  # e.g. PLLM_PLUGINS names an unknown plugin
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.check:
        return check(args.check, manager)
    selected, error = None, None
    try:
        selected = manager.resolve(args.device)
    except PluginError as exc:
        error = exc
    rows = [_HEADER] + [
        (
            "*" if selected is not None and entry is selected else "",
            entry.name,
            str(entry.origin),
            "-" if entry.api_version is None else str(entry.api_version),
            str(entry.detection.score),
            entry.detection.reason,
        )
        for entry in entries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join(cells + [row[-1]]).rstrip(), file=out)
    if error is not None:
        print(f"\nno platform selected for --device {args.device}: {error}", file=out)
        return 1
    print(f"\nselected: {selected.name} (--device {args.device})", file=out)
    try:
        caps = selected.platform_cls().capabilities
    except Exception as exc:  # noqa: BLE001 - a plugin's constructor may fail; say so, do not crash
        print(f"capabilities unavailable: {type(exc).__name__}: {exc}", file=out)
        return 0
    print(_describe(caps), file=out)
    return 0


def _describe(caps) -> str:
    def names(dtypes) -> str:
        return ", ".join(str(d).removeprefix("torch.") for d in dtypes)

    kv = names(caps.kv_cache_dtypes) or "none"
    formats = ", ".join(caps.weight_formats) or "none"
    return (f"dtypes: {names(caps.dtypes)} (default {names([caps.default_dtype])}); "
            f"8-bit KV cache (--kv-cache-dtype): {kv}; weights kept quantized "
            f"(--quantization gguf, int8 = Q8_0, fp8 = F8_E4M3): {formats}; block sizes: "
            f"{', '.join(map(str, caps.block_sizes))}")


def check(name: str, manager: PluginManager, pytest_args: list[str] | tuple[str, ...] = ()) -> int:
    """Run the conformance suite against platform ``name`` of ``manager``, in
    this process (the suite selects from ``manager``, so a plugin registered
    on it by hand is checked without being installed). ``pytest_args`` are
    added to pytest's (``-k``, ``-x``, ...)."""
    import pytest

    from pllm.testing import conformance_suite
    from pllm.testing.pytest_plugin import PLATFORM_ENV, using_manager

    try:
        manager.resolve(name)
    except PluginError as exc:
        print(f"error: cannot check {name!r}: {exc}", file=sys.stderr)
        return 1
    previous = os.environ.get(PLATFORM_ENV)
    os.environ[PLATFORM_ENV] = name  # read by the suite whether or not its plugin loaded
    try:
        with using_manager(manager):
            return int(pytest.main(["-q", "-p", "no:cacheprovider", conformance_suite.__file__,
                                    *pytest_args]))
    finally:
        if previous is None:
            os.environ.pop(PLATFORM_ENV, None)
        else:
            os.environ[PLATFORM_ENV] = previous


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pllm platforms", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
