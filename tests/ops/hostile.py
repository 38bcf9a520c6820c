"""GPU hazards that Triton's interpreter hides, made to show on CPU.

The interpreter runs a launch's programs one after another in grid order, each block operation at
once as a numpy operation, over CPU memory that a fresh allocation usually hands out zeroed, and
it checks no address. A GPU runs the programs concurrently in no set order, a program's threads
each at their own pace, over memory that holds whatever its last user left there, and an address
outside an allocation is a crash or a silent corruption. So five kinds of kernel bug pass in the
interpreter and fail (now and then) on a GPU. Under :func:`install`:

* **order**: each launch runs its programs in a random permutation of the grid, seeded, so that a
  failure replays with ``FAIRSEQ_PLUGIN_TEST_GRID_SEED``;
* **uninitialised memory**: ``torch.empty`` and its kin fill new memory with NaN (floating point)
  or the largest value (integers and bool): torch's ``fill_uninitialized_memory``, which acts
  under ``use_deterministic_algorithms`` (``warn_only``, so no op refuses to run);
* **bounds**: every address that a load, store or atomic touches under its mask must lie inside
  one of the launch's tensor arguments (its own span: storage offset to last element);
* **races between programs**: at the end of a launch, no address that one program stored may be
  loaded or stored by another (a read-modify-write by load and store instead of an atomic, say),
  and none that one program updates atomically may be loaded or stored plainly by another.
  Atomics among themselves are coherent;
* **races inside a program**: a load or store of an address that the same program stored since
  its last ``tl.debug_barrier()`` is an error. Triton orders one thread's accesses but not
  different threads', and which thread holds which element of a block is the layout's choice, so
  a program that reads back (or writes over) its own stores needs a barrier between the two.

Each violation raises at the access (a race between programs, at the end of the launch), naming
the kernel, the program(s) and, out of bounds, the nearest argument. Not checked: anything across
launches, and an atomic beside a plain access within one program. The
interpreter tests (test_triton_clustering.py, test_triton_attention.py, and the triton 3.6 subset)
install it in their interpreter processes; ``FAIRSEQ_PLUGIN_TEST_HOSTILE=0`` turns it off when
bisecting (its two self-tests in test_triton_clustering.py then skip, which the suite's parent
process, reading the interpreter run's outcomes, reports as failures).
"""

from __future__ import annotations

import os
import random

_STATE: dict = {}


def enabled() -> bool:
    return os.environ.get("FAIRSEQ_PLUGIN_TEST_HOSTILE", "1") != "0"


def describe() -> str:
    """For failure messages: how to replay this process's grid orders."""
    if not _STATE:
        return "grid order: in order (FAIRSEQ_PLUGIN_TEST_HOSTILE=0)"
    return f"grid order seed {_STATE['seed']} (FAIRSEQ_PLUGIN_TEST_GRID_SEED={_STATE['seed']} replays it)"


def _program(serial, launch: dict) -> tuple:
    ny, nz = launch["ny"], launch["nz"]
    serial = int(serial)
    return (serial // (ny * nz), (serial // nz) % ny, serial % nz)


def _spans(args, names) -> list:
    """(name, first byte, end byte) of every tensor argument of a launch (tuples flattened)."""
    spans = []
    for name, arg in zip(names, args):
        items = arg if isinstance(arg, tuple) else (arg,)
        for item in items:
            if hasattr(item, "data_ptr") and hasattr(item, "stride") and item.numel() > 0:
                last = sum((size - 1) * stride for size, stride in zip(item.shape, item.stride()))
                spans.append((name, item.data_ptr(), item.data_ptr() + (last + 1) * item.element_size()))
    return spans


def install() -> None:
    """Shuffle every interpreted launch's programs, poison uninitialised memory, and check every
    access's bounds and every program's barriers, for the rest of this process. Call it under
    ``TRITON_INTERPRET=1``."""
    if _STATE or not enabled():
        return
    import numpy as np
    import torch
    from triton.runtime import interpreter

    grid_seed = int(os.environ.get("FAIRSEQ_PLUGIN_TEST_GRID_SEED") or int.from_bytes(os.urandom(4), "little"))
    rng = random.Random(grid_seed)
    builder = interpreter.interpreter_builder
    executor = interpreter.GridExecutor
    set_dim, set_idx, init_args, call = (
        builder.set_grid_dim, builder.set_grid_idx, executor._init_args_hst, executor.__call__)
    masked_load, masked_store = builder.create_masked_load, builder.create_masked_store
    atomic_rmw, atomic_cas, barrier = builder.create_atomic_rmw, builder.create_atomic_cas, builder.create_barrier
    launch: dict = {"spans": [], "kernel": "?", "dirty": [], "program": None, "serial": 0,
                    "loaded": [], "stored": [], "atomic": []}

    def init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        names = list(self.arg_names[: len(args_hst)]) + list(kwargs_hst)
        launch.update(kernel=self.fn.__name__, spans=_spans([*args_hst, *kwargs_hst.values()], names))
        return args_hst, kwargs_hst

    def set_grid_dim(nx, ny, nz):
        set_dim(nx, ny, nz)
        order = list(range(nx * ny * nz))
        rng.shuffle(order)
        launch.update(ny=ny, nz=nz, order=order, loaded=[], stored=[], atomic=[])

    def set_grid_idx(x, y, z):
        # the interpreter walks x, y, z in order: run program order[i] as the i-th one instead
        ny, nz = launch["ny"], launch["nz"]
        p = launch["order"][(x * ny + y) * nz + z]
        program = _program(p, launch)
        set_idx(*program)
        launch.update(program=program, dirty=[], serial=p)

    def where() -> str:
        return f"kernel {launch['kernel']} program {launch['program']}, {describe()}"

    def active(ptrs, mask) -> "np.ndarray":
        addresses = np.asarray(ptrs.data, dtype=np.uint64).ravel()
        if mask is not None:
            addresses = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), ptrs.data.shape).ravel()]
        return addresses

    def check_bounds(what, ptrs, mask) -> "np.ndarray":
        addresses = active(ptrs, mask)
        if addresses.size == 0:
            return addresses
        width = ptrs.get_element_ty().primitive_bitwidth // 8
        inside = np.zeros(addresses.shape, dtype=bool)
        for _, start, end in launch["spans"]:
            inside |= (addresses >= start) & (addresses + width <= end)
        if not inside.all():
            bad = int(addresses[~inside][0])
            hint = ""
            if launch["spans"]:
                name, first, last = min(launch["spans"], key=lambda s: min(abs(bad - s[1]), abs(bad - s[2])))
                past = bad >= first
                off = (bad + width - last + width - 1) // width if past else (first - bad + width - 1) // width
                side = "past its end" if past else "before its start"
                hint = f"; nearest argument {name} spans [{first:#x}, {last:#x}), {off} element(s) {side}"
            raise AssertionError(
                f"{where()}: {what} of {int((~inside).sum())} address(es) outside every tensor argument, "
                f"first {bad:#x}{hint}"
            )
        return addresses

    def log_access(kind, addresses) -> None:
        launch[kind].append(np.stack([addresses, np.full(addresses.shape, launch["serial"], dtype=np.uint64)]))

    def shared(accesses, among) -> tuple:
        """Of the (address, program) pairs in accesses, at addresses in among: the addresses that
        more than one program touches, and for each a pair of those programs."""
        pairs = np.unique(np.concatenate(accesses, axis=1), axis=1)  # sorted by address, then program
        pairs = pairs[:, np.isin(pairs[0], among)]
        addresses, first, counts = np.unique(pairs[0], return_index=True, return_counts=True)
        at = first[counts > 1]
        return addresses[counts > 1], pairs[1, at], pairs[1, at + 1]

    def check_other_programs() -> None:
        """At the end of a launch: no address that one program stored is loaded or stored by another,
        and none that one program updates atomically is loaded or stored plainly by another. A GPU
        runs them concurrently, so whichever ran second here, they race."""
        plain = [*launch["stored"], *launch["loaded"]]
        if launch["atomic"] and plain:
            atomic = np.concatenate(launch["atomic"], axis=1)[0]
            mixed = np.intersect1d(atomic, np.concatenate(plain, axis=1)[0])
            clash, p, q = shared([*launch["atomic"], *plain], mixed)
            if clash.size:
                raise AssertionError(
                    f"kernel {launch['kernel']}, {describe()}: {clash.size} address(es) that one program updates "
                    f"atomically and another loads or stores plainly, first {int(clash[0]):#x} (programs "
                    f"{_program(p[0], launch)} and {_program(q[0], launch)}): the plain access races the atomic "
                    "(make both atomic, or split the launch)"
                )
        if launch["stored"]:
            clash, p, q = shared(plain, np.concatenate(launch["stored"], axis=1)[0])
            if clash.size:
                raise AssertionError(
                    f"kernel {launch['kernel']}, {describe()}: {clash.size} address(es) that one program "
                    f"stores and another loads or stores, first {int(clash[0]):#x} (programs "
                    f"{_program(p[0], launch)} and {_program(q[0], launch)}): programs run "
                    "concurrently on a GPU, in no set order (use atomics, or another launch)"
                )

    def check_race(what, addresses) -> None:
        if launch["dirty"] and addresses.size:
            clash = np.isin(addresses, np.concatenate(launch["dirty"]))
            if clash.any():
                raise AssertionError(
                    f"{where()}: {what} of {int(clash.sum())} address(es) that this program stored since its last "
                    "tl.debug_barrier(): other threads may not have stored them yet (add a barrier between the two)"
                )

    def create_masked_load(ptrs, mask, *rest):
        addresses = check_bounds("load", ptrs, mask)
        check_race("load", addresses)
        log_access("loaded", addresses)
        return masked_load(ptrs, mask, *rest)

    def create_masked_store(ptrs, value, mask, *rest):
        addresses = check_bounds("store", ptrs, mask)
        check_race("store", addresses)
        launch["dirty"].append(addresses)
        log_access("stored", addresses)
        return masked_store(ptrs, value, mask, *rest)

    def create_atomic_rmw(op, ptr, val, mask, *rest):
        log_access("atomic", check_bounds("atomic", ptr, mask))
        return atomic_rmw(op, ptr, val, mask, *rest)

    def create_atomic_cas(ptr, *rest):
        log_access("atomic", check_bounds("atomic", ptr, None))
        return atomic_cas(ptr, *rest)

    def create_barrier():
        launch["dirty"] = []
        return barrier()

    def run_launch(self, *args, **kwargs):
        result = call(self, *args, **kwargs)
        check_other_programs()
        return result

    executor._init_args_hst, executor.__call__ = init_args_hst, run_launch
    builder.set_grid_dim, builder.set_grid_idx = set_grid_dim, set_grid_idx
    builder.create_masked_load, builder.create_masked_store = create_masked_load, create_masked_store
    builder.create_atomic_rmw, builder.create_atomic_cas, builder.create_barrier = (
        create_atomic_rmw, create_atomic_cas, create_barrier)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    _STATE["seed"] = grid_seed
