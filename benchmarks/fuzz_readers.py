"""Fuzz gptlab's readers of untrusted files and print what happened.

The targets and mutations are those of ``tests/test_untrusted.py`` (checkpoint directory,
GGUF file, tokenizer files, LoRA adapter); here each runs many more cases and, instead of
stopping at the first bug, every exception other than ``UserError`` is counted as a crash and
grouped by type and place. The address space is capped (``RLIMIT_AS``) a few GiB above what the
seeds needed, so a file that makes a reader allocate terabytes shows up as a crash instead of
swapping the machine.

    .venv/bin/python benchmarks/fuzz_readers.py --examples 2500   # per reader: 10,000 in all
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF importer's progress bar, once per case

from hypothesis import HealthCheck, given, seed, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_untrusted as harness  # noqa: E402

from gptlab.errors import UserError  # noqa: E402


def where(e: BaseException) -> str:
    """The innermost frame of the traceback, as file:line."""
    frame = traceback.extract_tb(e.__traceback__)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}"


def fuzz(target: harness.Target, examples: int, random_seed: int) -> tuple[collections.Counter, dict]:
    outcomes: collections.Counter = collections.Counter()
    crashes: dict[str, tuple[int, str]] = {}

    @seed(random_seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=harness.cases(target))
    def one(case: tuple[str, bytes]) -> None:
        file, data = case
        try:
            target.run(file, data)
            outcomes["loaded"] += 1
        except UserError as e:
            if "\n" not in str(e):
                outcomes["UserError"] += 1
                return
            outcomes["crash"] += 1
            key = f"multi-line UserError at {where(e)}"
            count, example = crashes.get(key, (0, f"{file}: {str(e)[:160]!r}"))
            crashes[key] = (count + 1, example)
        except BaseException as e:  # every other exception is the finding, Rust panics (BaseException) too
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            outcomes["crash"] += 1
            key = f"{type(e).__name__} at {where(e)}"
            count, example = crashes.get(key, (0, f"{file}: {str(e).splitlines()[0][:120] if str(e) else ''}"))
            crashes[key] = (count + 1, example)

    one()
    return outcomes, crashes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2500, help="cases per reader")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--headroom-gib", type=float, default=4.0,
                        help="address space allowed above what the seeds used (RLIMIT_AS)")
    parser.add_argument("--only", nargs="*", help="reader names to run (default: all)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        targets = harness.build_targets(Path(tmp))
        limit = harness.cap_address_space(int(args.headroom_gib * 2**30))
        print(f"address space capped at {limit / 2**30:.1f} GiB; peak RSS after seeds "
              f"{harness.peak_rss_mib():.0f} MiB")
        total, total_crashes = 0, 0
        print(f"{'reader':<12}{'cases':>7}{'loaded':>8}{'UserError':>11}{'crashes':>9}{'peak RSS MiB':>14}{'s':>7}")
        found: dict[str, dict] = {}
        for name, target in targets.items():
            if args.only and name not in args.only:
                continue
            start = time.time()
            outcomes, crashes = fuzz(target, args.examples, args.seed)
            n = sum(outcomes.values())
            total += n
            total_crashes += outcomes["crash"]
            found[name] = crashes
            print(f"{name:<12}{n:>7}{outcomes['loaded']:>8}{outcomes['UserError']:>11}{outcomes['crash']:>9}"
                  f"{harness.peak_rss_mib():>14.0f}{time.time() - start:>7.0f}", flush=True)
        print(f"total: {total} cases, {total_crashes} crashes")
        for name, crashes in found.items():
            for key, (count, example) in sorted(crashes.items(), key=lambda kv: -kv[1][0]):
                print(f"  {name}: {count} x {key}  e.g. {example}")
    return 1 if total_crashes else 0


if __name__ == "__main__":
    sys.exit(main())
