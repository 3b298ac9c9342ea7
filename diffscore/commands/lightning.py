"""`diffscore fit / validate / test`: LightningCLI over any LightningModule and DataModule a YAML names."""

from __future__ import annotations

import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback, _InstantiatorFn

from diffscore.commands.config_checks import refuse_nonfinite
from diffscore.commands.resume import check_class_paths, continue_run, replaced_settings, same_class
from diffscore.errors import DiffscoreError
from diffscore.io import atomic_write
from diffscore.lit.callbacks.sample_grid import SampleGrid
from diffscore.lit.run_dir import run_dir
from diffscore.loading.classes import config_differences, flat_config
from diffscore.loading.files import read_torch_file
from diffscore.loading.legacy import modern_settings
from diffscore.loading.open import open_model

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


class RunConfig(SaveConfigCallback):
    """The run's own config in its folder: ``<run>/config.yaml``, then ``config.resume-<n>.yaml`` for the n-th
    resume (``config.validate-<n>.yaml`` / ``config.test-<n>.yaml`` for those); LightningCLI wrote one
    ``config.yaml`` per logger save_dir, shared by every run under it."""

    def __init__(self, parser: LightningArgumentParser, config: Any, **kwargs: Any) -> None:
        super().__init__(parser, config, save_to_log_dir=False, **kwargs)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        fn = trainer.state.fn.value if trainer.state.fn is not None else "fit"  # "fit", "validate", "test"
        kind = "resume" if fn == "fit" else fn  # a later fit of this run folder is a resume
        path, n = folder / self.config_filename, 0
        while path.exists():
            n += 1
            path = folder / f"config.{kind}-{n}.yaml"
        with atomic_write(path) as tmp:
            tmp.write_text(self.parser.dump(self.config, skip_none=False))


class LinkedFactsInstantiator(_InstantiatorFn):
    """Lightning's instantiator, without the data -> backbone links that jsonargparse skipped for a module that
    takes no backbone (StableDiffusionModule builds its network from a folder): Lightning still writes every
    applied link into the module's recorded hyper-parameters, and fails on the missing ``backbone`` key."""

    def __call__(self, class_type, *args, applied_instantiation_links: dict, **kwargs):
        if "backbone" not in inspect.signature(class_type).parameters:
            links = applied_instantiation_links
            applied_instantiation_links = {k: v for k, v in links.items() if ".backbone." not in k}
        return super().__call__(class_type, *args, applied_instantiation_links=applied_instantiation_links, **kwargs)


class DiffscoreCLI(LightningCLI):
    """LightningCLI over any LightningModule/DataModule named by ``class_path`` in the YAML."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunConfig,
            parser_kwargs={"description": "diffscore: train and validate a model from a YAML (--config)."},
            parser_class=DiffscoreArgumentParser,
            args=args,
            run=run,
            auto_configure_optimizers=False,
        )

    def _add_instantiators(self) -> None:
        self.parser.add_instantiator(LinkedFactsInstantiator(cli=self, key="model"), LightningModule, subclasses=True)
        self.parser.add_instantiator(_InstantiatorFn(cli=self, key="data"), LightningDataModule, subclasses=True)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test; sampling is `diffscore sample` (seeds split over devices, no config needed)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--init_from",
            type=str | None,
            default=None,
            help="fit: start from the (EMA) weights of this diffscore checkpoint or NVlabs/edm network .pkl, as "
            "EDM's --transfer (same network class and arguments; the optimizer starts fresh)",
        )
        # Facts of the data set the backbone's shape and label count: never typed twice.
        for source, target in (("data_shape", "data_shape"), ("label_dim", "label_dim")):
            parser.link_arguments(
                f"data.{source}", f"model.init_args.backbone.init_args.{target}", apply_on="instantiate"
            )

    def _parse_ckpt_path(self) -> None:
        """Resume/validate/test from --ckpt_path: the checkpoint's saved model settings are used (Lightning's rule);
        say which given values they replace, and rebuild only classes diffscore allows from a file."""
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if not path:
            return

        ckpt = read_torch_file(path)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
            raise DiffscoreError(f"--ckpt_path {path} is not a Lightning checkpoint (no state_dict)")
        hp = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if k != "_instantiator"}
        given = self.config[sub].model
        saved_data = (ckpt.get("datamodule_hyper_parameters") or {}).get("_class_path")
        given_data = (self.config[sub].get("data") or {}).get("class_path")
        if isinstance(saved_data, str) and given_data and not same_class(saved_data, given_data):
            raise DiffscoreError(
                f"--ckpt_path {path} was trained on {saved_data.rpartition('.')[2]}, but the config's data is "
                f"{given_data.rpartition('.')[2]}; pass the config it was trained with"
            )
        if str(hp.get("_class_path", "")).endswith("DiffusionModule"):  # an older main's checkpoint, in today's form
            augment = (given.get("init_args") or {}).get("augment") or []
            hp = modern_settings(hp, [a.as_dict() if hasattr(a, "as_dict") else a for a in augment])
        saved_class = hp.pop("_class_path", None)
        if saved_class and not same_class(saved_class, given.class_path):
            raise DiffscoreError(
                f"--ckpt_path {path} holds a {saved_class}, but the config's model is a {given.class_path}; "
                "pass the config the checkpoint was trained with"
            )
        if not hp:
            return
        check_class_paths(hp, f"--ckpt_path {path}")
        replaced = replaced_settings(flat_config(given.get("init_args")), flat_config(hp))
        if replaced:
            print(
                f"diffscore: {path} keeps its saved model settings; not used: {', '.join(replaced)} "
                "(to change them, start a new run from its weights with --init_from)",
                flush=True,
            )
        update = {sub: {"model": {"class_path": given.class_path, "dict_kwargs": hp}}}
        self.config = self.parser.parse_object(update, self.config)

    def before_instantiate_classes(self) -> None:
        sub = self.subcommand
        refuse_nonfinite(self.config[sub], "")
        if self.config[sub].get("ckpt_path"):
            continue_run(self.config[sub].trainer, Path(self.config[sub].ckpt_path))

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except RuntimeError as e:  # the weights of another network: torch's 40-line key listing
            if "Error(s) in loading state_dict" not in str(e) or isinstance(e, DiffscoreError):
                raise
            path = self.config[subcommand].get("ckpt_path")
            raise DiffscoreError(
                f"--ckpt_path {path}: its weights do not fit the configured model ({str(e).splitlines()[0][:160]}); "
                "pass the config it was trained with"
            ) from None

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

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand in ("validate", "test"):  # Lightning's table repeats every value per data loader
            kwargs["verbose"] = False
        return kwargs

    def after_validate(self) -> None:
        print_loss_table(self.trainer, ("heldout", "train_eval", "gap"), "val/loss")

    def after_test(self) -> None:
        print_loss_table(self.trainer, ("test",), "test/loss")

    def before_fit(self) -> None:
        path = self.config.fit.get("init_from")
        if path is None:
            return
        if self.config.fit.get("ckpt_path"):
            raise DiffscoreError("give --init_from (new weights) or --ckpt_path (resume a run), not both")
        source = open_model(path)
        source.denoiser("--init_from")
        mine = self.model.hparams.get("backbone")
        if source.backbone_config != mine:
            differ = "; ".join(config_differences(source.backbone_config, mine))
            raise DiffscoreError(
                f"--init_from {path}: its network is not the config's backbone ({differ}); "
                "set model.backbone to the same class and arguments"
            )
        self.model.backbone.load_state_dict(source.backbone.state_dict())
        print(f"diffscore: starting from the weights of {path}", flush=True)

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
            if isinstance(cb, SampleGrid) and cb.last_path:
                lines.append(f"  sample grid: {cb.last_path}")
        if lines:
            print(f"diffscore: fit finished after {trainer.global_step} steps.", *lines, sep="\n", flush=True)


def print_loss_table(trainer: Trainer, splits: tuple[str, ...], mean_key: str) -> None:
    """The loss per sigma bucket (a row each) of ``splits`` (a column each), and their mean, once on rank zero."""
    if not trainer.is_global_zero:
        return
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    sigmas = sorted({float(k.rsplit("_s", 1)[1]) for k in metrics if "/loss_s" in k})
    print(f"\n{'sigma':>10}" + "".join(f"{split:>14}" for split in splits))
    for s in sigmas:
        cells = [metrics.get(f"{split}/loss_s{s:g}") for split in splits]
        print(f"{s:>10g}" + "".join(f"{c:>14.6g}" if c is not None else f"{'-':>14}" for c in cells))
    if mean_key in metrics:
        print(f"{mean_key} (mean over the buckets): {metrics[mean_key]:.6g}")
