"""The `diffscore` command. ``fit``, ``validate`` and ``test`` are LightningCLI (diffscore.commands.lightning); every
other subcommand is a function whose signature and docstring jsonargparse turns into options and help."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffscore.errors import DiffscoreError, Stopped

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")
USAGE = """usage: diffscore SUBCOMMAND [options]   (diffscore SUBCOMMAND --help for its options)

Training (LightningCLI, a YAML config):
  fit           train a model: diffscore fit --config experiments/quickstart.yaml
  validate      held-out loss per sigma bucket of a checkpoint
  test          the test split's loss per sigma bucket of a checkpoint
From a checkpoint (a diffscore .ckpt or an NVlabs/edm network .pkl):
  sample        draw samples (PNGs or .npz), split by seed over devices
  evaluate      FID/KID/IS/FID-k, FD-digits, memorization (EDM's protocol with --protocol edm)
  refstats      Inception (or digits) reference statistics of a data set
  probe         gaussian: EV of the learned score vs Gaussian/GMM/delta mixture; ntk: NTK measurements
  report        plot a run's metrics.jsonl as PNGs
  convert       an NVlabs/edm network pickle (*.pkl) as a diffscore checkpoint (read without running its code)
  phema         EMA checkpoints of any length after training, from a run's PostHocEMA snapshots (EDM2)
Data:
  dataset       convert images to EDM's dataset format (a ZIP or folder of PNGs + dataset.json)
  suggest-noise sigma_data, sigma_min/max, P_mean/P_std from the data's Gaussian model: --config X.yaml or --data PATH
"""


def subcommands() -> dict[str, Any]:
    """The non-Lightning subcommands as jsonargparse's CLI takes them (imported here, on demand)."""
    from diffscore.commands.convert import convert
    from diffscore.commands.evaluate import evaluate, refstats
    from diffscore.commands.phema import phema
    from diffscore.commands.probe import probe_gaussian, probe_ntk
    from diffscore.commands.report import report
    from diffscore.commands.sample import sample
    from diffscore.commands.suggest_noise import suggest_noise
    from diffscore.data.convert import convert_dataset

    return {
        "sample": sample,
        "evaluate": evaluate,
        "refstats": refstats,
        "probe": {"gaussian": probe_gaussian, "ntk": probe_ntk},
        "report": report,
        "dataset": convert_dataset,
        "convert": convert,
        "phema": phema,
        "suggest-noise": suggest_noise,
    }


def _fail(message: str) -> None:
    if "Original Traceback" in message:  # raised in a DataLoader worker: keep the original one-line message
        message = message.strip().splitlines()[-1].split("DiffscoreError: ", 1)[-1]
    print(f"diffscore: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _dispatch(argv: list[str]) -> Callable[[], Any]:
    if not argv or argv[0] in ("-h", "--help"):
        return lambda: print(USAGE, end="")
    if argv[0] in LIGHTNING_SUBCOMMANDS or argv[0].startswith("-"):
        from diffscore.commands.config_checks import check_config_files
        from diffscore.commands.lightning import DiffscoreCLI

        check_config_files(argv)

        return lambda: DiffscoreCLI(args=argv)
    known = ("sample", "evaluate", "refstats", "probe", "report", "dataset", "convert", "suggest-noise", "phema")
    if argv[0] not in known:
        return lambda: _fail(f"unknown subcommand {argv[0]!r}\n{USAGE}")
    from jsonargparse import CLI

    if argv[0] == "refstats" and any(a == "--config" or a.startswith("--config=") for a in argv):
        return lambda: _fail("refstats takes the YAML whose data: section to use as --data_config X.yaml")
    if argv[0] == "report" and len(argv) > 1 and not argv[1].startswith("-"):  # `diffscore report RUN_DIR`
        argv = ["report", "--run_dir", *argv[1:]]
    if argv[0] == "suggest-noise":  # `--config X.yaml` names the training config to read, not jsonargparse's own
        argv = [("--data_config" + a[8:]) if a == "--config" or a.startswith("--config=") else a for a in argv]
    if argv[0] == "phema":  # `--sigma_rel 0.03 0.05` (space-separated) as jsonargparse's one-token list
        from diffscore.commands.phema import join_list_options

        argv = join_list_options(argv)
    return lambda: CLI(subcommands(), args=argv, as_positional=False, prog="diffscore")


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
