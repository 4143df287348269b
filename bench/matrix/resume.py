"""Which run ``attnbench run --resume`` continues, and whether a run folder can be resumed.

``--resume`` without ``--run-id`` continues only an unambiguous *unfinished* run of the same
config (its folder named ``<time>-<config name>``, or its env.json or config.toml naming
the same config); several, or only finished ones, are an error that lists them. A folder
whose rows have no readable env.json is never resumed: a new env.json would give its
earlier rows another environment and measurement time.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from attnbench import results as R
from attnbench.matrix.config import Config, ConfigError, expand

__all__ = ["ResumeError", "candidates", "check_env", "pick_run"]


class ResumeError(ConfigError):
    """A resume that would have to guess, or a run folder that cannot be resumed safely."""


def _same_config(folder: Path, cfg: Config) -> bool:
    """Whether ``folder`` holds a run of ``cfg`` (by folder name, env.json or config.toml)."""
    if folder.name.endswith(f"-{cfg.name}"):
        return True
    try:
        old = R.load_env(folder).get("config_path")
    except R.ResultsError:
        old = None
    if old and cfg.path and Path(old).resolve() == cfg.path.resolve():
        return True
    saved = folder / R.CONFIG_FILE
    try:
        return saved.is_file() and saved.read_text(encoding="utf-8") == cfg.text
    except (OSError, UnicodeDecodeError):
        return False


def candidates(cfg: Config, results_dir: Path, only: Sequence[str] = (),
               retry_failed: bool = False) -> List[Tuple[str, int, int, Optional[str]]]:
    """``(run id, cells done, cells selected, problem)`` of every run folder of ``cfg``
    under ``results_dir``, by name (``problem``: why its rows cannot be read)."""
    if not results_dir.is_dir():
        return []
    ids = [c.id for c in expand(cfg, only)]
    out = []
    for folder in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        marks = (R.ROWS_FILE, R.ENV_FILE, R.CONFIG_FILE)
        if not any((folder / m).exists() for m in marks) or not _same_config(folder, cfg):
            continue
        try:
            states = R.finished_cells(folder, include_failed=not retry_failed)
            problem = None
        except R.ResultsError as err:
            states, problem = {}, str(err)
        out.append((folder.name, sum(i in states for i in ids), len(ids), problem))
    return out


def _listing(runs) -> str:
    return ", ".join(f"{r} ({'unreadable rows' if p else f'{d} of {n} cells done'})"
                     for r, d, n, p in runs)


def pick_run(cfg: Config, results_dir: Path, only: Sequence[str] = (),
             retry_failed: bool = False) -> Optional[str]:
    """The run id ``--resume`` continues: the one unfinished run of ``cfg``; ``None`` when
    there is no run of it at all; :class:`ResumeError` naming them otherwise."""
    runs = candidates(cfg, results_dir, only, retry_failed)
    if not runs:
        return None
    unfinished = [r for r in runs if r[3] or r[1] < r[2]]
    if len(unfinished) == 1:
        return unfinished[0][0]
    if not unfinished:
        raise ResumeError(f"--resume: every run of {cfg.name!r} under {results_dir} is finished "
                          f"({_listing(runs)}); leave out --resume to start a new run, or "
                          f"give --run-id RUN to run missing cells in one of them")
    raise ResumeError(f"--resume: {len(unfinished)} unfinished runs of {cfg.name!r} under "
                      f"{results_dir} could be meant: {_listing(unfinished)}; choose one "
                      f"with --run-id RUN")


def check_env(run_dir: Path) -> None:
    """:class:`ResumeError` when ``run_dir`` holds rows but no readable env.json."""
    rows = run_dir / R.ROWS_FILE
    try:
        has_rows = rows.is_file() and rows.read_text(encoding="utf-8").strip() != ""
    except (OSError, UnicodeDecodeError):
        has_rows = True
    if not has_rows:
        return
    env = run_dir / R.ENV_FILE
    why = "is missing" if not env.exists() else None
    if why is None:
        try:
            R.load_env(run_dir)
        except R.ResultsError as err:
            why = f"cannot be read ({err})"
    if why:
        raise ResumeError(f"{env} {why}, so the environment and time of the rows in {rows} "
                          f"are unknown; resuming would record new ones for them. Restore "
                          f"env.json, or start a new run (another --run-id)")
