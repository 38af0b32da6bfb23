"""LightningCLI for training, validation, testing and prediction.

``python -m patchalign fit|validate|test|predict --config configs/stage1.yaml``. Extra verbs that are
not Trainer methods (``export``, ``report``, ...) are dispatched by :mod:`patchalign.__main__` before
LightningCLI parses anything.

What this adds to LightningCLI, and why:

* **Checkpoints.** ``--ckpt_path`` takes a Lightning ``.ckpt``, an export directory or the released
  ``patchalign3d.pt``. The encoder architecture is read from that file (or from
  ``model.init_args.init_from``) and replaces the config's, so a config never has to restate it.
  Lightning's own hook would instead feed every saved hyper-parameter back as an ``__init__``
  argument, which breaks on the provenance our modules record (``encoder_config``, ``text_encoder``).
* **One run folder.** Checkpoints go to ``<trainer.default_root_dir>/checkpoints`` unless a
  ``dirpath`` is given, decided when the trainer is built and never written into the saved config:
  ``--trainer.default_root_dir`` moves a whole run, and a Slurm requeue finds its files again.
* **No silent overwrite.** ``test`` refuses a ``default_root_dir`` that already holds an earlier
  evaluation (``config.yaml``, ``eval/``) unless ``--overwrite`` is given.
* **One-line errors.** A misspelled key, a missing file or a constructor's refusal prints one line
  (``patchalign <verb>: error: ...``) and exits with status 2, instead of the usage text or the
  "Does not validate against any of the Union subtypes" dump jsonargparse wraps around it. Set
  ``PATCHALIGN_TRACEBACK=1`` for the full traceback.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import ActionYesNo
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from patchalign.checkpoints import CheckpointError

#: ``--ckpt_path`` values Lightning resolves itself (no file to read here).
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")

#: what ``test`` writes under ``trainer.default_root_dir``: the saved config and the results folder
#: (``patchalign.eval.module.RESULTS_DIR``; the training layer does not import evaluation code).
TEST_OUTPUTS = ("config.yaml", "eval")

#: encoder settings that are not architecture: a Stage 2 run keeps its own when ``init_from`` names
#: a Stage 1 file (``--ckpt_path`` resumes take the checkpoint's, like everything else).
_TRAINING_ONLY_FIELDS = ("drop_path_rate",)

#: logit-parameter settings a Lightning checkpoint's module was built with (their tensors' shapes).
_LOGIT_HPARAMS = ("loss", "temperature", "max_logit_scale")


class ConfigError(ValueError):
    """The configuration (or a file it names) cannot be used; the message is the one line shown."""


# ---------------------------------------------------------------------------------- errors in one line

_BOILERPLATE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value|"
    r"- Expected a <class 'NoneType'>|Expected a <class 'NoneType'>)"
)


def _did_you_mean(class_path: str | None, option: str) -> str:
    """`` (did you mean 'root'?)`` for a misspelled init argument of ``class_path``."""
    if not class_path:
        return ""
    module, _, name = class_path.rpartition(".")
    try:
        params = list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    except Exception:  # noqa: BLE001 - only a hint; the error itself is already known
        return ""
    close = difflib.get_close_matches(option, params, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def condense_parse_error(message: str) -> str:
    """The one useful line of a jsonargparse error message.

    jsonargparse reports a bad key inside a ``class_path`` block as a nested "Does not validate
    against any of the Union subtypes" listing (subtypes, given value, the ``NoneType`` alternative):
    keep the key path, the class and the innermost reason.
    """
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if len(lines) <= 1:
        return message.strip()
    keys = re.findall(r'Parser key "([^"]+)"', message)
    classes = re.findall(r"Problem with given class_path '([^']+)'", message)
    reasons = [
        ln
        for ln in lines
        if not _BOILERPLATE.match(ln.lstrip("- "))
        and not _BOILERPLATE.match(ln)
        and not ln.startswith("Parser key")
        and "Problem with given class_path" not in ln
    ]
    reason = reasons[-1] if reasons else lines[-1]
    reason = reason.lstrip("- ").rstrip(":")
    hint = ""
    m = re.search(r"Option '([^']+)' is not accepted", reason)
    if m:
        hint = _did_you_mean(classes[-1] if classes else None, m.group(1))
    where = ".".join(keys)
    cls = f" ({classes[-1]})" if classes else ""
    return f"{where}{cls}: {reason}{hint}" if where else f"{reason}{hint}"


class PatchAlignArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose command-line errors are one line (no 60-90 lines of usage)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("PATCHALIGN_TRACEBACK"):
            super().error(message, ex)
        sys.stderr.write(f"patchalign: error: {condense_parse_error(message)} (--help lists the options)\n")
        raise SystemExit(2)


def _root_cause(err: BaseException) -> BaseException:
    """The exception a class's ``__init__`` raised, under jsonargparse's union-type wrapping."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


# ---------------------------------------------------------------------------------- config helpers


def data_target_widths(data: Any) -> dict[str, int]:
    """Widths the model's head must match, read from the data module's manifest and text bank.

    Linked into the model (``model.init_args.target_widths``) so the head width is never typed twice:
    Stage 1 takes ``features`` (teacher width), Stage 2 takes ``text`` (text-bank width).
    """
    widths: dict[str, int] = {}
    path = getattr(data, "data_path", None)
    if path is None:
        return widths
    from patchalign.data.textbank import load_text_bank
    from patchalign.data.writer import read_manifest

    manifest = read_manifest(path)
    if manifest.feature_dim:
        widths["features"] = int(manifest.feature_dim)
    bank_path = getattr(data, "text_bank_path", None) or manifest.text_bank_path()
    if bank_path is not None and Path(bank_path).exists():
        widths["text"] = load_text_bank(bank_path).dim
    return widths


def _get(ns: Any, *keys: str) -> Any:
    for k in keys:
        if ns is None or not hasattr(ns, "get"):
            return None
        ns = ns.get(k)
    return ns


def _same_dir(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _is_rank_zero() -> bool:
    """Rank of this process before the trainer exists (the launcher's environment variables)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


class PatchAlignCLI(LightningCLI):
    """LightningCLI with the data→model links, checkpoint-aware architecture, one run folder,
    overwrite protection and one-line errors (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", PatchAlignArgumentParser)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(
            "data", "model.init_args.target_widths", compute_fn=data_target_widths, apply_on="instantiate"
        )
        parser.add_argument(
            "--overwrite",
            action=ActionYesNo,
            default=False,
            help="test: replace an earlier evaluation in trainer.default_root_dir (config.yaml, eval/)",
        )

    def _parse_ckpt_path(self) -> None:
        """Replaces Lightning's hook (run right after parsing, before seeding and building anything).

        Lightning 2.6 merges a checkpoint's ``hyper_parameters`` into the model config as ``__init__``
        arguments, which fails on the provenance keys our modules record and would let a checkpoint
        silently override the config. What a checkpoint must decide (the architecture, the logit
        parameters' form) is read here instead, and printed when it changes the config. The input
        checks run here too, so a bad path is reported before any work.
        """
        subcommand = self.config.get("subcommand")
        cfg = self.config.get(subcommand, self.config) if subcommand else self.config
        self._check_ckpt_path(cfg)
        self._route_ckpt_path(cfg, subcommand)
        self._check_init_from(cfg)
        self._share_text_bank(cfg)
        self._architecture_from_checkpoint(cfg)
        self._check_checkpoint_dir(cfg, subcommand)
        if subcommand == "test":
            self._protect_earlier_results(cfg)
        cfg["overwrite"] = False  # a flag of this command, never of a config saved for later runs

    def _set_seed(self) -> None:
        # Seed quietly; "Seed set to N" is printed once the classes are built, so that a refused
        # input is the only line of a failed command.
        seed = self._get(self.config, "seed_everything")
        if seed is False:
            return
        seed = seed_everything(None if seed is True else seed, workers=True, verbose=False)
        self._seed = seed
        (self.config[self.subcommand] if self.subcommand else self.config)["seed_everything"] = seed

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            root = _root_cause(err)
            if root is err or os.environ.get("PATCHALIGN_TRACEBACK"):
                raise
            raise ConfigError(f"{type(root).__name__}: {root}".replace("\n", " ")) from root

    def after_instantiate_classes(self) -> None:
        """Put checkpoints under ``<default_root_dir>/checkpoints`` unless a ``dirpath`` was given."""
        if getattr(self, "_seed", None) is not None:
            rank_zero_info(f"Seed set to {self._seed}")
        root = Path(self.trainer.default_root_dir)
        for cb in self.trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = os.path.realpath(root / "checkpoints")

    # ------------------------------------------------------------------ the checks

    def _check_ckpt_path(self, cfg: Any) -> None:
        """A local file, loaded weights-only: Lightning's ``--weights_only false`` (and its default for
        URLs) would unpickle whatever the file holds, so both are refused and ``weights_only`` is set."""
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path and "://" in str(ckpt_path):
            raise ConfigError(f"--ckpt_path {ckpt_path}: must be a local file (download it first)")
        if ckpt_path and str(ckpt_path) not in SPECIAL_CKPT_PATHS and not Path(ckpt_path).exists():
            raise ConfigError(f"--ckpt_path {ckpt_path}: no such file or directory")
        if "weights_only" in cfg:
            if cfg.get("weights_only") is False:
                raise ConfigError(
                    "--weights_only false would unpickle arbitrary code from the checkpoint; "
                    "checkpoints are always loaded weights-only"
                )
            cfg["weights_only"] = True

    def _share_text_bank(self, cfg: Any) -> None:
        """``data.init_args.text_bank`` is the model's too, unless the model names its own.

        Both modules have a ``text_bank`` hyper-parameter, and Lightning refuses to log two different
        values under one name ("Error while merging hparams").
        """
        bank = _get(cfg, "data", "init_args", "text_bank")
        init_args = _get(cfg, "model", "init_args")
        if bank and init_args is not None and "text_bank" in init_args and not init_args.get("text_bank"):
            init_args["text_bank"] = bank

    def _check_init_from(self, cfg: Any) -> None:
        init_from = _get(cfg, "model", "init_args", "init_from")
        if init_from and not Path(init_from).exists():
            raise ConfigError(f"model.init_args.init_from {init_from}: no such file or directory")

    def _route_ckpt_path(self, cfg: Any, subcommand: str | None) -> None:
        """Where the weights of an explicit ``--ckpt_path`` file go.

        A Lightning checkpoint is restored by Lightning, so ``init_from`` (a Stage 1 file, or the
        eval configs' ``patchalign3d.pt``) is not read at all. An export directory or a released
        ``.pt`` has no trainer state: for ``validate/test/predict`` it becomes
        ``model.init_args.init_from`` with ``init_head: true`` and the strict load applies; so does
        a Lightning checkpoint of another module class holding training-only modules (a
        ``JointTraining`` run's distillation head) when it is evaluated.
        """
        ckpt_path = cfg.get("ckpt_path")
        if not ckpt_path or str(ckpt_path) in SPECIAL_CKPT_PATHS:
            return
        from patchalign.checkpoints import detect_kind

        kind = detect_kind(ckpt_path)
        init_args = _get(cfg, "model", "init_args")
        if kind == "lightning" and subcommand != "fit" and self._training_only_modules(cfg, ckpt_path):
            kind = "lightning, training-only heads dropped"  # evaluate its encoder, head and logit only
        elif kind == "lightning":
            if init_args is not None and init_args.get("init_from"):
                skipped = init_args["init_from"]
                print(f"--ckpt_path {ckpt_path}: weights restored from it; init_from {skipped} not read")
                init_args["init_from"] = None
            return
        if subcommand == "fit":
            raise ConfigError(
                f"--ckpt_path {ckpt_path} holds weights only ({kind}), no training state to resume: "
                f"start from its weights with --model.init_args.init_from {ckpt_path}"
            )
        if init_args is None or "init_from" not in init_args:
            raise ConfigError(
                f"--ckpt_path {ckpt_path} holds weights only ({kind}) and this model has no init_from "
                "to load them: evaluate it with a configs/eval/ config"
            )
        init_args["init_from"] = str(ckpt_path)
        init_args["init_head"] = True
        cfg["ckpt_path"] = None
        print(f"--ckpt_path {ckpt_path}: {kind} format, loaded through model.init_args.init_from (strict)")

    @staticmethod
    def _training_only_modules(cfg: Any, ckpt_path: str) -> list[str]:
        """Modules of a Lightning checkpoint that another module class cannot restore (e.g. the
        distillation head of a :class:`~patchalign.training.modules.JointTraining` run evaluated by
        ``ZeroShotSegmentation``): such a file's weights go through ``init_from`` instead (strict on
        the encoder), since Lightning's strict restore would refuse the extra tensors."""
        from patchalign.checkpoints import read_checkpoint

        ckpt = read_checkpoint(ckpt_path)
        own_class = ckpt.hparams.get("_class_path")
        if own_class is None or own_class == _get(cfg, "model", "class_path"):
            return []
        init_args = _get(cfg, "model", "init_args")
        if init_args is None or "init_from" not in init_args:
            return []
        return [m for m in ckpt.extra.get("other_modules", []) if m != "logit_params"]

    def _architecture_from_checkpoint(self, cfg: Any) -> None:
        """Set ``model.init_args.encoder``'s config from the file the weights come from.

        The source is ``--ckpt_path`` (a Lightning checkpoint) or else ``init_from``. With
        ``init_from`` and no ``init_head`` (Stage 1 -> Stage 2) the head width and the training-only
        settings stay the config's: the new head is linked to the text-bank width.
        """
        init_args = _get(cfg, "model", "init_args")
        enc = _get(init_args, "encoder", "init_args", "config")
        if init_args is None or enc is None:
            return
        ckpt_path = cfg.get("ckpt_path")
        from_ckpt = bool(ckpt_path) and str(ckpt_path) not in SPECIAL_CKPT_PATHS
        source = ckpt_path if from_ckpt else init_args.get("init_from")
        if not source:
            return
        from patchalign.checkpoints import read_checkpoint

        ckpt = read_checkpoint(source)
        if ckpt.encoder_config is None:
            return
        keep: tuple[str, ...] = ()
        if not from_ckpt:
            keep = _TRAINING_ONLY_FIELDS + (() if init_args.get("init_head") else ("head_dim",))
        changed = []
        for key, value in ckpt.encoder_config.to_dict().items():
            if key in keep:
                continue
            if enc.get(key) != value:
                changed.append(f"{key} {enc.get(key)} -> {value}")
            enc[key] = value
        if from_ckpt and ckpt.kind == "lightning":
            for key in _LOGIT_HPARAMS:
                if key in init_args and key in ckpt.hparams and init_args[key] != ckpt.hparams[key]:
                    changed.append(f"{key} {init_args[key]} -> {ckpt.hparams[key]}")
                    init_args[key] = ckpt.hparams[key]
        if changed:
            print(f"architecture from {source}: {', '.join(changed)}")

    def _check_checkpoint_dir(self, cfg: Any, subcommand: str | None) -> None:
        """Refuse a ``dirpath`` pinned to another run's ``checkpoints`` folder (old saved configs)."""
        trainer = cfg.get("trainer")
        if subcommand != "fit" or trainer is None:
            return
        root = Path(trainer.get("default_root_dir") or ".")
        for cb in trainer.get("callbacks") or []:
            dirpath = _get(cb, "init_args", "dirpath")
            if not str(cb.get("class_path", "")).endswith("ModelCheckpoint") or not dirpath:
                continue
            dirpath = Path(dirpath)
            if dirpath.name == "checkpoints" and not _same_dir(dirpath.parent, root):
                raise ConfigError(
                    f"ModelCheckpoint dirpath {dirpath} is the checkpoints folder of another run "
                    f"({dirpath.parent}), not of trainer.default_root_dir {root}: remove dirpath from the "
                    "config (checkpoints then go to <default_root_dir>/checkpoints)"
                )

    def _protect_earlier_results(self, cfg: Any) -> None:
        """``test`` into a folder holding an earlier evaluation: refuse, or clear it with --overwrite."""
        root = Path(_get(cfg, "trainer", "default_root_dir") or ".")
        found = [root / name for name in TEST_OUTPUTS if (root / name).exists()]
        if not found:
            return
        if not cfg.get("overwrite"):
            raise ConfigError(
                f"{root} already holds an evaluation ({', '.join(p.name for p in found)}): pass --overwrite "
                "to replace it, or another --trainer.default_root_dir"
            )
        if _is_rank_zero():
            for p in found:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            print(f"--overwrite: removed the earlier {', '.join(p.name for p in found)} in {root}")


def cli_main(args: list[str] | None = None, run: bool = True) -> PatchAlignCLI:
    """Entry point used by ``python -m patchalign`` and by the demo (``args`` given explicitly).

    ``args=None`` reads ``sys.argv``. Lightning warns when ``args`` is given while ``sys.argv`` has
    arguments too (the demo calls this from ``python -m patchalign demo``): passing them is the
    intended use here, so that warning is silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return PatchAlignCLI(
            # A requeued Slurm job re-runs the same command into the same log dir: overwrite its config
            # (``test`` refuses an earlier evaluation before that, see ``--overwrite``).
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )


def run_cli(args: list[str] | None = None) -> int:
    """``cli_main`` with the one-line error policy: exit status 2 and one line on stderr for a bad
    configuration, a missing file, a file that would be overwritten or a run Lightning refuses."""
    try:
        cli_main(args)
    except (
        ConfigError,
        CheckpointError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        MisconfigurationException,  # Lightning's word for a run its settings cannot do
    ) as err:
        if os.environ.get("PATCHALIGN_TRACEBACK"):
            raise
        verb = (args or sys.argv[1:] or ["patchalign"])[0]
        sys.stderr.write(f"patchalign {verb}: error: {str(err).strip()}\n")
        return 2
    return 0
