"""What the command-line tools (``segment``, ``demo``, ``eval``, ``calibrate``) share: a terminal
progress bar (a :class:`core.backend.Progress` drawing a tqdm bar on stderr) and the rule that
every failure is one line on stderr and exit code 2."""
from __future__ import annotations

import sys
from typing import Any, Callable

from .core.backend import Progress
from .core.errors import EmergentSegError, Interrupted


def run_command(commands: dict[str, Callable[[Any, "TerminalProgress"], Any]], args: Any) -> int:
    """Run ``commands[args.command](args, bar)``; a clear failure prints ``error: ...`` and gives 2."""
    try:
        commands[args.command](args, TerminalProgress(args.command, not getattr(args, "quiet", False)))
    except (EmergentSegError, Interrupted) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # every file is written whole or not at all (core.images.save_png), so files already
        # written for earlier images stay valid
        print("\nerror: interrupted; every file written so far is complete (none is left half-written)",
              file=sys.stderr)
        return 130
    return 0


class TerminalProgress:
    """A Progress bound to a terminal bar (tqdm when installed, else a plain counter)."""

    def __init__(self, label: str, enabled: bool = True) -> None:
        self.label, self.enabled, self._bar = label, enabled, None

    def __call__(self) -> Progress:
        return Progress(on_update=self._update)

    def _update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            print(f"\r{self.label}: {done}/{total}", end="" if done < total else "\n", file=sys.stderr)
            return
        if self._bar is None:
            # no rate field: the first update jumps from 0 and would show a meaningless it/s
            self._bar = tqdm(total=total, desc=self.label, leave=False, file=sys.stderr,
                             bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()
        if done >= total:
            self._bar.close()
            self._bar = None
