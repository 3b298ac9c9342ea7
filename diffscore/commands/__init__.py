"""The `diffscore` command: LightningCLI (fit/validate/test/predict) plus `diffscore sample`."""

from __future__ import annotations

import os
import re
import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffscore.errors import DiffscoreError

DESCRIPTION = (
    "diffscore: score-based diffusion research on an EDM core.\n"
    "Training and evaluation: fit, validate, test, predict (LightningCLI, below).\n"
    "Sampling from a checkpoint: diffscore sample --ckpt_path CKPT --num_samples N --out DIR_or_file.npz "
    "(see diffscore sample --help).\n"
    "Metrics: diffscore evaluate --ckpt_path CKPT [--metrics fid,kid,is] [--protocol edm]; "
    "diffscore refstats --config X.yaml --out ref.npz; diffscore report RUN_DIR (plots as PNGs).\n"
    "Score analysis: diffscore probe gaussian --ckpt_path CKPT [--out DIR]; "
    "diffscore probe ntk --ckpt_path CKPT [--reference_ckpt EARLIER.ckpt].\n"
    "Making a data set: diffscore dataset --source SRC --dest out.zip [--resolution R --transform center-crop]."
)


_NOISE = (
    "Parser key",
    "Does not validate",
    "Subtypes:",
    "Errors:",
    "- Expected a <class 'NoneType'>",
    "Given value",
    "- Problem with given class_path",
)


def condense_parser_error(message: str) -> str:
    """jsonargparse's nested error report -> 'model.num_steps (diffscore.lit.DiffusionModule): <what is wrong>'."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    keys = [m.group(1) for line in lines if (m := re.match(r'Parser key "([^"]+)":', line))]
    if not keys:
        return " ".join(lines)
    cls = re.search(r"class_path '([^']+)'", message)
    details = [line for line in lines if not line.startswith(_NOISE)]
    detail = details[-1] if details else lines[-1]
    return f"{'.'.join(keys)}{f' ({cls.group(1)})' if cls else ''}: {detail.removeprefix('- ')}"


class DiffscoreArgumentParser(LightningArgumentParser):
    """Reports a bad option in one line (set DIFFSCORE_DEBUG=1 for jsonargparse's full report)."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("DIFFSCORE_DEBUG"):
            return super().error(message, ex)
        prog = self.prog.replace(" [options]", "")
        print(f"diffscore: error: {condense_parser_error(message)}  (options: {prog} --help)", file=sys.stderr)
        raise SystemExit(2)


class DiffscoreCLI(LightningCLI):
    """LightningCLI over any LightningModule/DataModule named by ``class_path`` in the YAML."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": DESCRIPTION},
            parser_class=DiffscoreArgumentParser,
            args=args,
            run=run,
            auto_configure_optimizers=False,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Facts of the data set the backbone's shape and label count: never typed twice.
        for source, target in (("data_shape", "data_shape"), ("label_dim", "label_dim")):
            parser.link_arguments(
                f"data.{source}", f"model.init_args.backbone.init_args.{target}", apply_on="instantiate"
            )

    def instantiate_classes(self) -> None:
        """Build the configured objects; a constructor's DiffscoreError is reported as itself."""
        DiffscoreError.last = None
        try:
            super().instantiate_classes()
        except DiffscoreError:
            raise
        except Exception:
            if DiffscoreError.last is not None:
                raise DiffscoreError.last from None
            raise

    def after_fit(self) -> None:
        """Say where the results are."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        lines = []
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint):
                if cb.last_model_path:
                    lines.append(f"  last checkpoint: {cb.last_model_path}")
                if cb.monitor and cb.best_model_path:
                    lines.append(f"  best checkpoint ({cb.monitor}): {cb.best_model_path}")
            if getattr(cb, "last_path", None):
                lines.append(f"  sample grid: {cb.last_path}")
        if lines:
            print(f"diffscore: fit finished after {trainer.global_step} steps.", *lines, sep="\n", flush=True)


def _fail(message: str) -> None:
    if "Original Traceback" in message:  # raised in a DataLoader worker: keep the original one-line message
        message = message.strip().splitlines()[-1].split("DiffscoreError: ", 1)[-1]
    print(f"diffscore: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def main(args: list[str] | None = None) -> None:
    """Entry point of the `diffscore` console script."""
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv and argv[0] == "sample":
            from diffscore.lit.sample import sample_cli

            sample_cli(argv[1:])
        elif argv and argv[0] in ("evaluate", "refstats"):
            from jsonargparse import CLI

            from diffscore.lit import evaluate as ev

            CLI(getattr(ev, argv[0]), args=argv[1:], as_positional=False)
        elif argv[:2] == ["probe", "gaussian"]:
            from jsonargparse import CLI

            from diffscore.lit.gaussian_probe import probe_gaussian

            CLI(probe_gaussian, args=argv[2:], as_positional=False)
        elif argv[:2] == ["probe", "ntk"]:
            from jsonargparse import CLI

            from diffscore.lit.ntk_probe import probe_ntk

            CLI(probe_ntk, args=argv[2:], as_positional=False)
        elif argv and argv[0] == "report":
            from jsonargparse import CLI

            from diffscore.lit.report import report

            CLI(report, args=argv[1:], as_positional=True)
        elif argv and argv[0] == "dataset":
            from jsonargparse import CLI

            from diffscore.data.convert import convert_dataset

            CLI(convert_dataset, args=argv[1:], as_positional=False)
        else:
            DiffscoreCLI(args=None if args is None else argv)
    except DiffscoreError as e:
        if os.environ.get("DIFFSCORE_DEBUG"):
            raise
        _fail(str(e))
    except FileNotFoundError as e:
        if os.environ.get("DIFFSCORE_DEBUG"):
            raise
        _fail(f"file not found: {e.filename or e}; check the path")
    except KeyboardInterrupt:
        print("diffscore: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except SIGTERMException:
        print(
            "diffscore: stopped by SIGTERM (a checkpoint was saved if the config has PreemptionCheckpoint)",
            file=sys.stderr,
        )
        raise SystemExit(143) from None


__all__ = ["DiffscoreCLI", "main"]
