"""The experiments beside the library, and what their command lines share.

Every experiment is a plain function ``main(out, ..., **settings)`` run by :func:`cli` (``python -m
experiments.NAME --flag value``): the function's arguments are the options, declared once. Long commands say which
phase they are in (:func:`phase`) and show a progress bar per phase (:func:`progress`, :func:`attach_progress`,
:class:`CountingQuery`), so that a run is never silent for minutes.
"""

from __future__ import annotations

import inspect
import logging
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["UsageError", "cli", "phase", "progress", "attach_progress", "CountingQuery", "as_list", "quiet_third_party"]


class UsageError(ValueError):
    """A command got a setting it does not know or a value it cannot use (shown without a traceback)."""


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_third_party() -> None:
    """Silence MONAI's notices about the optional nvImageCodec DICOM decoder.

    Loading the Sunnybrook DICOM slices builds MONAI's DICOM readers, which log that nvImageCodec is missing and
    warn that its pydicom plugin did not register; pydicom decodes the slices either way, so the notices tell a user
    nothing. Safe to call more than once.
    """
    logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage("nvImageCodec is not available"))
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)


def phase(message: str) -> None:
    """Print the phase a command enters (stderr, so that stdout keeps only the result tables)."""
    print(f"== {message}", file=sys.stderr, flush=True)


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it", **kwargs: Any):
    """A tqdm bar on stderr (``TQDM_DISABLE=1`` turns the bars off)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.5, **kwargs)


def _loss_value(output: Any) -> float | None:
    """The loss in an ignite engine's output: a dict, or MONAI's per-sample list of dicts."""
    item = output[0] if isinstance(output, (list, tuple)) and output else output
    loss = item.get("loss") if isinstance(item, dict) else None
    return None if loss is None else float(loss)


def attach_progress(engine: Any, desc: str) -> None:
    """Show an ignite engine's run (e.g. MONAI's ``SupervisedTrainer``) as a bar of iterations with the current loss.

    The bar only reads the engine's state: the training itself is unchanged. A resumed run starts at its iteration.
    """
    from ignite.engine import Events

    state: dict[str, Any] = {}

    def start(e):
        total = e.state.max_epochs * e.state.epoch_length
        state["bar"] = progress(total=total, initial=e.state.iteration, desc=desc, unit="step")

    def step(e):
        loss = _loss_value(e.state.output)
        if loss is not None:
            state["bar"].set_postfix(loss=f"{loss:.4f}", refresh=False)
        state["bar"].update(1)

    engine.add_event_handler(Events.STARTED, start)
    engine.add_event_handler(Events.ITERATION_COMPLETED, step)
    engine.add_event_handler(Events.COMPLETED, lambda e: state["bar"].close())


class CountingQuery:
    """A black box (images -> probabilities) that counts the images sent through it on a progress bar.

    Args:
        query: the wrapped black box; its other attributes (e.g. ``n_queries``) read through.
        total: images expected (the bar's length).
        desc: the bar's label.
    """

    def __init__(self, query: Callable, total: int, desc: str) -> None:
        self.query = query
        self.bar = progress(total=total, desc=desc, unit="img", leave=False)

    def __call__(self, images):
        out = self.query(images)
        self.bar.update(int(images.shape[0]))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["query"], name)

    def close(self) -> None:
        self.bar.close()


def as_list(value: str | Sequence[str], choices: Sequence[str], option: str) -> list[str]:
    """An option given once (``--archs unet``) or as a comma list (``--archs unet,segresnet``), checked.

    Raises:
        UsageError: a value outside ``choices``.
    """
    values = [value] if isinstance(value, str) else list(value)
    unknown = [v for v in values if v not in choices]
    if unknown:
        raise UsageError(f"--{option}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(choices)}.")
    return values


def _check_options(main: Callable[..., Any], args: Sequence[str]) -> None:
    """Refuse an option ``main`` has no parameter for (fire would run ``main`` first and complain after).

    A ``main`` with ``**settings`` checks its settings itself.
    """
    params = inspect.signature(main).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for arg in args:
        if arg == "--":  # fire's own flags follow
            return
        name = arg[2:].split("=", 1)[0].replace("-", "_") if arg.startswith("--") else None
        if name and name != "help" and name not in params and not (name.startswith("no") and name[2:] in params):
            options = ", ".join("--" + n.replace("_", "-") for n in params)
            raise UsageError(f"unknown option {arg.split('=', 1)[0]}; the options are {options}.")


def _join_list_options(main: Callable[..., Any], args: Sequence[str]) -> list[str]:
    """Accept ``--archs unet segresnet`` as well as ``--archs unet,segresnet`` for the options whose default is a
    tuple (fire reads a comma list; the values after the flag up to the next option are joined into one)."""
    lists = {n for n, p in inspect.signature(main).parameters.items() if isinstance(p.default, tuple)}
    out, i = [], 0
    while i < len(args):
        out.append(args[i])
        i += 1
        if out[-1].startswith("--") and out[-1][2:].replace("-", "_") in lists:
            values = []
            while i < len(args) and not args[i].startswith("-"):
                values.append(args[i])
                i += 1
            out += [",".join(values)] if values else []
    return out


def cli(main: Callable[..., Any], argv: Sequence[str] | None = None) -> int:
    """Run ``main`` as a command line (python-fire: ``--steps 800``, ``--test-patient P``, ``--fast``; a list
    option takes ``--archs unet,segresnet`` or ``--archs unet segresnet``).

    Returns the exit status: 0 when ``main`` returns, 2 for an unknown option or setting, a bad value or a missing
    data folder (the message is printed without a traceback).
    """
    import fire

    from monai_stealthmark.data.sunnybrook import DataFileError

    args = _join_list_options(main, list(sys.argv[1:] if argv is None else argv))
    quiet_third_party()
    spec = getattr(sys.modules.get(main.__module__), "__spec__", None)
    name = spec.name if spec is not None else main.__module__  # as in python -m NAME
    try:
        _check_options(main, args)
        fire.Fire(main, command=args, name=name)
    except fire.core.FireExit as e:  # fire printed what it could not parse
        return int(e.code or 0)
    except (UsageError, DataFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
