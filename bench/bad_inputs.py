"""Every case of tests/test_bad_inputs.py's table run as the test runs it, printed as a markdown row: the case, the
exit code, whether it is one `diffscore: error:` line holding the expected words, and that line (issue 34's count
in bench/RESULTS.md).

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/bad_inputs.py > /tmp/bad_inputs.md
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import test_bad_inputs as table  # noqa: E402
from tests.conftest import QUICKSTART, TINY, run_cli  # noqa: E402


def main() -> None:
    os.chdir(tempfile.mkdtemp())
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        run_cli(["fit", "--config", QUICKSTART, *TINY, "--trainer.max_steps=4"])  # the tests' tiny checkpoint
    ckpt = next(Path(".").glob("runs/**/checkpoints/last.ckpt")).resolve()
    os.environ.pop("DIFFSCORE_INCEPTION_WEIGHTS", None)
    good = 0
    print("| case | exit | one line | the line |\n| --- | --- | --- | --- |")
    for name, (make, needle) in table.CASES.items():
        tmp = Path(tempfile.mkdtemp())
        os.chdir(tmp)
        os.environ["TORCH_HOME"] = str(tmp / "torch-home")  # no Inception weights anywhere
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = run_cli([str(a) for a in make(tmp, ckpt)])
        lines = [line for line in err.getvalue().strip().splitlines() if line.strip()]
        last = lines[-1].replace(str(tmp), "<tmp>").replace(str(ckpt), "<ckpt>") if lines else ""
        ok = code != 0 and last.startswith("diffscore: error:") and needle in last
        good += ok
        print(f"| {name} | {code} | {'yes' if ok else 'NO'} | `{last}` |", flush=True)
    print(f"\n{good} of {len(table.CASES)} cases: one line and a non-zero exit")


if __name__ == "__main__":
    main()
