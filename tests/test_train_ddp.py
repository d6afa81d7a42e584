"""Two processes under torchrun (gloo, CPU) train a rewritten tiny GPT exactly like one process on the same batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from einrewrite.data import load_corpus
from einrewrite.moe import BTTMoELinear
from einrewrite.train import TrainConfig, train

# The worker is a script (torchrun runs files); the test also execs it to build the single-process reference.
WORKER = '''
from __future__ import annotations

import sys

import torch

import einrewrite as er
from einrewrite.data import load_corpus
from einrewrite.gpt import GPTConfig, build_gpt
from einrewrite.train import TrainConfig, train


def build() -> tuple[torch.nn.Module, TrainConfig]:
    # BTT in attention, BTT-MoE (router, top-k, aux loss) in the MLP
    overrides = {"re:.*mlp\\\\..*": er.LayerOverride(structure="btt_moe", budget=er.FlopBudget(ratio=1.0))}
    config = er.RewriteConfig(structure="btt", budget=er.FlopBudget(ratio=0.5), init="mup", min_features=1,
                              overrides=overrides)
    model, _ = build_gpt(GPTConfig(d_model=32, d_head=16, n_layer=1, block_size=16), config, seed=0)
    return model, TrainConfig(steps=3, batch_size=8, block_size=16, lr=1e-2, warmup=1, eval_every=3, eval_batches=2)


if __name__ == "__main__":
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model, cfg = build()
    result = train(model, load_corpus(max_bytes=100_000), cfg)
    if dist.get_rank() == 0:
        torch.save({"state": model.state_dict(), "val": result.final_val_loss}, sys.argv[1])
    # both ranks tear down together: a gloo rank that exits while its peer is still saving aborted
    # ("terminate called without an active exception") in about 1 run of 30
    dist.barrier()
    dist.destroy_process_group()
'''


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend


def test_ddp_two_processes_equal_one_process_on_the_same_global_batch(tmp_path: Path) -> None:
    script = tmp_path / "ddp_worker.py"
    script.write_text(WORKER)
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(out)
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out)

    namespace: dict[str, object] = {"__name__": "ddp_reference"}
    exec(compile(WORKER, str(script), "exec"), namespace)
    model, cfg = namespace["build"]()  # type: ignore[operator]
    assert sum(isinstance(m, BTTMoELinear) for m in model.modules()) == 2
    # one process with the two micro-batches the two ranks took: the same global batch, the same router inputs
    single = TrainConfig(**{**cfg.to_dict(), "grad_accum": 2, "betas": cfg.betas})
    result = train(model, load_corpus(max_bytes=100_000), single)
    state = model.state_dict()
    assert set(state) == set(ddp["state"])
    for name, value in state.items():
        torch.testing.assert_close(ddp["state"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    fresh, _ = namespace["build"]()  # type: ignore[operator]
    moved = sum(not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), state.values(), strict=True))
    assert moved > 10  # training really changed the parameters being compared
    assert ddp["val"] == pytest.approx(result.final_val_loss, rel=1e-5)
