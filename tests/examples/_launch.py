"""Run examples/train_ddp.py in a test subprocess (plain python or torchrun).

Fault injection for the tests only: ``SEGKD_TEST_FAIL_RANK=R`` and ``SEGKD_TEST_FAIL_ITER=K`` make rank ``R``
raise ``RuntimeError`` in its training step at iteration ``K`` (0-based); ``SEGKD_TEST_STEP_SLEEP=S`` sleeps ``S``
seconds in every training step (so that a test can kill the run part-way); ``SEGKD_TEST_DISC_DIR=D`` makes each rank
save its discriminator's parameters to ``D/rank<R>.pt`` after every discriminator update.
"""

import os
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "examples"))

if "SEGKD_TEST_FAIL_RANK" in os.environ:
    from segkd_examples import engine

    fail_rank = int(os.environ["SEGKD_TEST_FAIL_RANK"])
    fail_iter = int(os.environ.get("SEGKD_TEST_FAIL_ITER", "0"))
    original = engine.DistillationStep.forward
    calls = {"n": 0}

    def failing_forward(self, images, labels, teacher_out):
        if int(os.environ.get("RANK", "0")) == fail_rank and calls["n"] >= fail_iter:
            raise RuntimeError(f"injected failure on rank {fail_rank} at step {calls['n']}")
        calls["n"] += 1
        return original(self, images, labels, teacher_out)

    engine.DistillationStep.forward = failing_forward

if "SEGKD_TEST_STEP_SLEEP" in os.environ:
    import time

    from segkd_examples import engine as _engine

    _sleep = float(os.environ["SEGKD_TEST_STEP_SLEEP"])
    _forward = _engine.DistillationStep.forward

    def slow_forward(self, images, labels, teacher_out):
        time.sleep(_sleep)
        return _forward(self, images, labels, teacher_out)

    _engine.DistillationStep.forward = slow_forward

if "SEGKD_TEST_DISC_DIR" in os.environ:
    import torch

    from segkd_examples import engine as _disc_engine

    _disc_step = _disc_engine._discriminator_step

    def recording_disc_step(distiller, discriminator, *args, **kwargs):
        out = _disc_step(distiller, discriminator, *args, **kwargs)
        state = {name: p.detach().cpu().clone() for name, p in discriminator.named_parameters()}
        torch.save(state, Path(os.environ["SEGKD_TEST_DISC_DIR"]) / f"rank{os.environ.get('RANK', '0')}.pt")
        return out

    _disc_engine._discriminator_step = recording_disc_step

sys.argv = [str(ROOT / "examples" / "train_ddp.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
