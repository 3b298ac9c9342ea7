"""The `diffscore` command. ``fit``, ``validate`` and ``test`` are LightningCLI (diffscore.commands.lightning); every
other subcommand is a function whose signature and docstring jsonargparse turns into options and help."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diffscore.commands.boundary import fail, guarded, sigterm_raises


@dataclass(frozen=True)
class Subcommand:
    """One `diffscore` subcommand: where it lives and the line that describes it (usage text, README, tests)."""

    name: str  # as typed: "sample", "probe gaussian"
    target: str  # "module:function"; "" for the LightningCLI subcommands
    section: str  # the heading it is listed under
    summary: str  # one line


TRAINING = "Training (LightningCLI, a YAML config)"
FROM_MODEL = "From a model (a diffscore .ckpt or an NVlabs/edm network .pkl)"
DATA = "Data"
SUBCOMMANDS = (
    Subcommand("fit", "", TRAINING, "train a model: diffscore fit --config experiments/quickstart.yaml"),
    Subcommand("validate", "", TRAINING, "held-out loss per sigma bucket of a checkpoint"),
    Subcommand("test", "", TRAINING, "the test split's loss per sigma bucket of a checkpoint"),
    Subcommand(
        "sample",
        "diffscore.commands.sample:sample",
        FROM_MODEL,
        "draw samples (PNGs or .npz), split by seed over devices",
    ),
    Subcommand(
        "evaluate",
        "diffscore.commands.evaluate:evaluate",
        FROM_MODEL,
        "FID/KID/IS/FID-k, FD-digits, memorization (EDM's protocol with --protocol edm)",
    ),
    Subcommand(
        "refstats",
        "diffscore.commands.refstats:refstats",
        DATA,
        "Inception (or digits) reference statistics of a data set",
    ),
    Subcommand(
        "probe gaussian",
        "diffscore.commands.probe:probe_gaussian",
        FROM_MODEL,
        "EV of the learned score vs the Gaussian, GMM and delta-mixture scores of the data",
    ),
    Subcommand(
        "probe ntk",
        "diffscore.commands.probe:probe_ntk",
        FROM_MODEL,
        "NTK measurements: score error, spectrum, drift, kernel twin",
    ),
    Subcommand("report", "diffscore.commands.report:report", TRAINING, "plot a run's metrics.jsonl as PNGs"),
    Subcommand(
        "convert",
        "diffscore.commands.convert:convert",
        FROM_MODEL,
        "an NVlabs/edm network pickle (*.pkl) as a diffscore checkpoint (read without running its code)",
    ),
    Subcommand(
        "phema",
        "diffscore.commands.phema:phema",
        TRAINING,
        "EMA checkpoints of any length after training, from a run's PostHocEMA snapshots (EDM2)",
    ),
    Subcommand(
        "dataset",
        "diffscore.commands.dataset:dataset",
        DATA,
        "images (a folder, ZIP or CIFAR-10's archive) as EDM's dataset format (a ZIP or folder of PNGs + dataset.json)"
        ", or with --encode SD_FOLDER as an EDM2-style latent dataset",
    ),
    Subcommand(
        "suggest-noise",
        "diffscore.commands.suggest_noise:suggest_noise",
        DATA,
        "sigma_data, sigma_min/max, P_mean/P_std from the data's Gaussian model: --config X.yaml or --data PATH",
    ),
)
LIGHTNING_SUBCOMMANDS = tuple(c.name for c in SUBCOMMANDS if not c.target)


def usage() -> str:
    """The text of `diffscore --help`, from SUBCOMMANDS."""
    lines = ["usage: diffscore SUBCOMMAND [options]   (diffscore SUBCOMMAND --help for its options)"]
    for section in dict.fromkeys(c.section for c in SUBCOMMANDS):
        lines += ["", f"{section}:"]
        lines += [f"  {c.name:<15} {c.summary}" for c in SUBCOMMANDS if c.section == section]
    return "\n".join(lines) + "\n"


def subcommand_of(argv: list[str]) -> tuple[Subcommand | None, list[str]]:
    """The subcommand ``argv`` names (one word, or two for probe) and the arguments after its name."""
    for words in (2, 1):
        name = " ".join(argv[:words])
        for c in SUBCOMMANDS:
            if c.name == name:
                return c, argv[words:]
    return None, argv[1:]


def function_of(subcommand: Subcommand) -> Callable[..., Any]:
    """The function behind a subcommand (imported here, on demand)."""
    module, _, name = subcommand.target.partition(":")
    return getattr(importlib.import_module(module), name)


def _dispatch(argv: list[str]) -> Callable[[], Any]:
    if not argv or argv[0] in ("-h", "--help"):
        return lambda: print(usage(), end="")
    if argv[0] in LIGHTNING_SUBCOMMANDS or argv[0].startswith("-"):
        from diffscore.commands.config_checks import check_config_files
        from diffscore.commands.lightning import DiffscoreCLI

        def lightning() -> Any:
            check_config_files(argv)
            return DiffscoreCLI(args=argv)

        return lightning
    command, rest = subcommand_of(argv)
    if command is None:
        known = "probe gaussian|ntk" if argv[0] == "probe" else f"{argv[0]!r}"
        return lambda: fail(f"unknown subcommand {known}\n{usage()}")
    if command.name == "report" and rest and not rest[0].startswith("-"):  # `diffscore report RUN_DIR`
        rest = ["--run_dir", *rest]
    if command.name in ("suggest-noise", "refstats"):  # `--config X.yaml`: the training config whose data to read
        rest = [("--data_config" + a[8:]) if a == "--config" or a.startswith("--config=") else a for a in rest]
    if command.name == "phema":  # `--sigma_rel 0.03 0.05` (space-separated) as jsonargparse's one-token list
        from diffscore.commands.phema import join_list_options

        rest = join_list_options(rest)
    from diffscore.commands.parsing import call

    def run() -> Any:
        with sigterm_raises():
            return call(function_of(command), f"diffscore {command.name}", rest)

    return run


def quiet_console() -> None:
    """Hide what the user cannot act on: Lightning's litlogger tip, torch's LeafSpec deprecation inside
    Lightning, and LightningCLI's note that args were given (main always gives them)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    # validate/test take the EMA weights the checkpoint holds; the averaging state only matters to fit
    warnings.filterwarnings("ignore", message=r"You're using the WeightAveraging callback, but loading a checkpoint")
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _no_tip not in logger.filters:  # main() runs many times in one process (tests)
        logger.addFilter(_no_tip)


def _no_tip(record) -> bool:
    return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


def main(args: list[str] | None = None) -> None:
    """Entry point of the `diffscore` console script: every failure is one line (diffscore.commands.boundary)."""
    argv = sys.argv[1:] if args is None else list(args)
    quiet_console()
    guarded(_dispatch(argv))


__all__ = ["main"]
