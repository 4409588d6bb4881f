"""The `bertkern` command: `bertkern info`, `bertkern bench ...`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

USAGE = """usage: bertkern <command> [args]
  info [--json]     what is built and usable here (versions, bertkern._C and why not, GPU, backend per op)
  bench [args]      the benchmark suite (benchmarks/run.py of a source checkout; --help for its args)
  verify MODEL      run MODEL (a directory, or "minilm") eager and optimized, say which backend ran each
                    op; exit 0 passed, 1 past the 2x-of-eager rule, 2 usage error (--help for its args)"""


def _bench(argv: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    run = root / "benchmarks" / "run.py"
    if not run.exists():
        print(f"bertkern bench: {run} not found; the benchmarks ship with the source checkout "
              "(pip install -e . from a clone)", file=sys.stderr)
        return 2
    import torch

    if "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        # Without a GPU the Triton kernels run in its interpreter, and triton must see TRITON_INTERPRET=1
        # when it is imported (set later, every interpreted kernel after the first fails). `import bertkern`
        # has imported it (torch._dynamo does): run the benchmarks in a fresh process with the variable.
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.call([sys.executable, "-m", "bertkern", "bench", *argv], env=env)
    sys.path.insert(0, str(run.parent))
    import run as bench_run  # benchmarks/run.py

    return bench_run.main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "info":
        from bertkern.info import main as info_main

        return info_main(rest)
    if command == "bench":
        return _bench(rest)
    if command == "verify":
        from bertkern.verify import main as verify_main

        return verify_main(rest)
    print(f"bertkern: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
