"""Two GPU hazards that Triton's interpreter hides, made to show on CPU.

The interpreter runs a launch's programs one after another in grid order, over CPU memory that a
fresh allocation usually hands out zeroed. A GPU runs them concurrently, in no set order, over
memory that holds whatever its last user left there. So a kernel that reads what another program
of the same launch wrote, or a buffer that nobody initialised, passes in the interpreter and fails
(now and then) on a GPU. Under :func:`install`:

* each launch runs its programs in a random permutation of the grid, seeded, so that a failure
  replays with ``FAIRSEQ_PLUGIN_TEST_GRID_SEED``;
* ``torch.empty`` and its kin fill new memory with NaN (floating point) or the largest value
  (integers and bool): torch's ``fill_uninitialized_memory``, which acts under
  ``use_deterministic_algorithms`` (``warn_only``, so no op refuses to run).

The interpreter tests (test_triton_clustering.py, test_triton_attention.py) install it in their
interpreter processes; ``FAIRSEQ_PLUGIN_TEST_HOSTILE=0`` turns it off when bisecting.
"""

from __future__ import annotations

import os
import random

_STATE: dict = {}


def enabled() -> bool:
    return os.environ.get("FAIRSEQ_PLUGIN_TEST_HOSTILE", "1") != "0"


def seed() -> int:
    """The grid-order seed of this process (0 before :func:`install`)."""
    return _STATE.get("seed", 0)


def describe() -> str:
    """For failure messages: how to replay this process's grid orders."""
    if not _STATE:
        return "grid order: in order (FAIRSEQ_PLUGIN_TEST_HOSTILE=0)"
    return f"grid order seed {_STATE['seed']} (FAIRSEQ_PLUGIN_TEST_GRID_SEED={_STATE['seed']} replays it)"


def install() -> None:
    """Shuffle every interpreted launch's programs and poison uninitialised memory, for the rest of
    this process. Call it after triton is importable, under ``TRITON_INTERPRET=1``."""
    if _STATE or not enabled():
        return
    import torch
    from triton.runtime import interpreter

    grid_seed = int(os.environ.get("FAIRSEQ_PLUGIN_TEST_GRID_SEED") or int.from_bytes(os.urandom(4), "little"))
    rng = random.Random(grid_seed)
    builder = interpreter.interpreter_builder
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
    launch: dict = {}

    def set_grid_dim(nx, ny, nz):
        set_dim(nx, ny, nz)
        order = list(range(nx * ny * nz))
        rng.shuffle(order)
        launch.update(ny=ny, nz=nz, order=order)

    def set_grid_idx(x, y, z):
        # the interpreter walks x, y, z in order: run program order[i] as the i-th one instead
        ny, nz = launch["ny"], launch["nz"]
        p = launch["order"][(x * ny + y) * nz + z]
        set_idx(p // (ny * nz), (p // nz) % ny, p % nz)
        _STATE["programs"] = _STATE.get("programs", 0) + 1

    builder.set_grid_dim, builder.set_grid_idx = set_grid_dim, set_grid_idx
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    _STATE["seed"] = grid_seed
