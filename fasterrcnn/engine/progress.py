"""Progress for long work: a tqdm bar on a terminal, plain log lines elsewhere (CI, files)."""

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("fasterrcnn")


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool = True, every: int = 0):
        self.interactive = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.count = 0
        self.start = time.perf_counter()
        self.bar = (
            tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False) if self.interactive else None
        )

    def update(self, n: int = 1, **postfix) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
        elif self.enabled and self.every and (self.count % self.every == 0 or self.count == self.total):
            text = " ".join(f"{k}={v}" for k, v in postfix.items())
            log.info("%s %d/%d %s", self.desc, self.count, self.total, text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
