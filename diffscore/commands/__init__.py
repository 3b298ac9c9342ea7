"""The `diffscore` command. ``fit``, ``validate`` and ``test`` are LightningCLI (diffscore.commands.lightning); every
other subcommand is a function whose signature and docstring jsonargparse turns into options and help."""

from __future__ import annotations

import errno
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffscore.errors import DiffscoreError, Stopped


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
        "diffscore.commands.evaluate:refstats",
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


def _fail(message: str) -> None:
    if "Original Traceback" in message:  # raised in a DataLoader worker: keep the original one-line message
        message = message.strip().splitlines()[-1].split("DiffscoreError: ", 1)[-1]
    print(f"diffscore: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _dispatch(argv: list[str]) -> Callable[[], Any]:
    if not argv or argv[0] in ("-h", "--help"):
        return lambda: print(usage(), end="")
    if argv[0] in LIGHTNING_SUBCOMMANDS or argv[0].startswith("-"):
        from diffscore.commands.config_checks import check_config_files
        from diffscore.commands.lightning import DiffscoreCLI

        check_config_files(argv)

        return lambda: DiffscoreCLI(args=argv)
    command, rest = subcommand_of(argv)
    if command is None:
        known = "probe gaussian|ntk" if argv[0] == "probe" else f"{argv[0]!r}"
        return lambda: _fail(f"unknown subcommand {known}\n{usage()}")
    if command.name == "refstats" and any(a == "--config" or a.startswith("--config=") for a in rest):
        return lambda: _fail("refstats takes the YAML whose data: section to use as --data_config X.yaml")
    if command.name == "report" and rest and not rest[0].startswith("-"):  # `diffscore report RUN_DIR`
        rest = ["--run_dir", *rest]
    if command.name == "suggest-noise":  # `--config X.yaml` names the training config to read, not jsonargparse's own
        rest = [("--data_config" + a[8:]) if a == "--config" or a.startswith("--config=") else a for a in rest]
    if command.name == "phema":  # `--sigma_rel 0.03 0.05` (space-separated) as jsonargparse's one-token list
        from diffscore.commands.phema import join_list_options

        rest = join_list_options(rest)
    from diffscore.commands.parsing import call

    return lambda: call(function_of(command), f"diffscore {command.name}", rest)


def quiet_console() -> None:
    """Hide what the user cannot act on: Lightning's litlogger tip, torch's LeafSpec deprecation inside
    Lightning, and LightningCLI's note that args were given (main always gives them)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _no_tip not in logger.filters:  # main() runs many times in one process (tests)
        logger.addFilter(_no_tip)


def _no_tip(record) -> bool:
    return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


def main(args: list[str] | None = None) -> None:
    """Entry point of the `diffscore` console script."""
    argv = sys.argv[1:] if args is None else list(args)
    quiet_console()
    try:
        _dispatch(argv)()
    except DiffscoreError as e:
        if os.environ.get("DIFFSCORE_DEBUG"):
            raise
        _fail(str(e))
    except FileNotFoundError as e:
        if os.environ.get("DIFFSCORE_DEBUG"):
            raise
        _fail(f"file not found: {e.filename or e}; check the path")
    except MisconfigurationException as e:  # Lightning's word for a bad trainer/callback setting
        if os.environ.get("DIFFSCORE_DEBUG"):
            raise
        _fail(f"{str(e).strip().splitlines()[0]}  (check the trainer options of the config)")
    except OSError as e:
        if e.errno != errno.ENOSPC or os.environ.get("DIFFSCORE_DEBUG"):
            raise
        _fail(f"no space left on the device writing {e.filename or 'the output'}; free space and run again")
    except Stopped as e:
        print(
            f"diffscore: stopped by {e.signal_name}; nothing was written (its temporary parts are removed)",
            file=sys.stderr,
        )
        raise SystemExit(e.code) from None
    except KeyboardInterrupt:
        print("diffscore: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except SIGTERMException:
        print(
            "diffscore: stopped by SIGTERM (a checkpoint was saved if the config has PreemptionCheckpoint)",
            file=sys.stderr,
        )
        raise SystemExit(143) from None


__all__ = ["main"]
