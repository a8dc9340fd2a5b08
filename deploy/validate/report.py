"""The checks' results: one line each as they come, and a summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable


@dataclass
class Report:
    """Results of every check, printed as they come and summed up at the end."""

    passed: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)

    def check(self, name: str, problems: Iterable[str]) -> None:
        problems = list(problems)
        if problems:
            self.failed += 1
            self.failures.extend(f"{name}: {p}" for p in problems)
            print(f"FAIL  {name}")
            for p in problems:
                print(f"        - {p}")
        else:
            self.passed += 1
            print(f"ok    {name}")
