"""Hardmax dynamics in float64: do tokens cluster at the leaders, and how fast? (docs/results.md §3)

Runs z_i <- (z_i + alpha * mean_{j in C_i(z)} z_j) / (1 + alpha), C_i = argmax_j <A z_i, z_j>, for many
layers with :func:`fairseq_plugin.ops.hardmax_attention` (``alpha``, ``qk_matrix`` = A,
``return_leaders``), on random points in general position and on small hand-made configurations,
for several alpha and A (identity, random SPD). For every case it checks, without trusting the
theory:

- *converged*: every token is within ``tol`` of its limit leader (of the tokens it attends to in the
  last layer, the one that stopped moving first), and the distinct limit points are strict leaders of the limit configuration
  (<A p, p> > <A p, q> for every other limit point q: a clustered equilibrium, every point a fixed point);
- *contraction*: in the tail, ||z_i(t+1) - z_i(T)|| / ||z_i(t) - z_i(T)|| against 1/(1+alpha);
- *initial leaders?*: whether every limit point is the initial position of an initial strict leader,
  or new leaders emerged (a follower whose target moved away can end up leading itself).

A population run adds, per dimension and A, the fraction of random configurations whose limit is
not the initial leaders. Output (``--out``): dynamics.csv / dynamics.md (the checks), population.csv /
population.md, plots/<case>.png (d = 2 trajectories) and plots/<case>.gif for the emerging cases.

    python -m experiments.hardmax.dynamics --out outputs/hardmax/dynamics
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from fairseq_plugin.ops import hardmax_attention

TOL = 1e-9  # distance below which two float64 points (coordinates ~1) are the same limit point


@dataclass
class Case:
    name: str
    z0: Tensor  # (T, d) float64
    alpha: float
    A: Optional[Tensor] = None  # (d, d) SPD; None = identity
    a_kind: str = "I"
    kind: str = "random"  # random | small
    note: str = ""


class Simulation(NamedTuple):
    traj: Tensor  # (layers + 1, B, T, d)
    leaders: Tensor  # (layers, B, T) bool: token in its own attention set at the input of each layer
    set_size: Tensor  # (layers, B, T)


def random_points(n: int, d: int, seed: int) -> Tensor:
    """Standard normal points (general position with probability one); same draw as tests/ops."""
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def random_spd(d: int, seed: int) -> Tensor:
    b = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return b @ b.T + 0.5 * torch.eye(d, dtype=torch.float64)


def simulate(z0: Tensor, alpha: float, A: Optional[Tensor], layers: int) -> Simulation:
    """``layers`` hardmax layers on (T, d) or (B, T, d) float64 points (B configurations at once)."""
    if z0.dtype != torch.float64:
        raise TypeError(f"simulate runs in float64 (ties and the tail need it), got {z0.dtype}")
    z = z0 if z0.dim() == 3 else z0.unsqueeze(0)
    z = z.unsqueeze(1)  # (B, 1, T, d): one head
    traj, leaders, sizes = [z[:, 0]], [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only add overhead (30x on a busy 2-core machine)
    try:
        for _ in range(layers):
            z, info = hardmax_attention(z, z, z, alpha=alpha, qk_matrix=A, return_leaders=True)
            traj.append(z[:, 0])
            leaders.append(info.leaders[:, 0])
            sizes.append(info.set_size[:, 0])
    finally:
        torch.set_num_threads(threads)
    return Simulation(torch.stack(traj), torch.stack(leaders), torch.stack(sizes))


def strict_leaders(z: Tensor, A: Optional[Tensor]) -> Tensor:
    """(T,) bool for points (T, d): <A z_i, z_i> > <A z_i, z_j> for every j != i."""
    s = (z if A is None else z @ A) @ z.T
    off = s.clone()
    off.fill_diagonal_(-math.inf)
    return s.diagonal() > off.amax(-1)


def settle_layer(traj: Tensor, tol: float = 1e-13) -> Tensor:
    """(T,) the first layer from which each token stays within ``tol`` of its final position.

    Not bitwise: once a follower is within an ulp of its leader they tie exactly, and the average
    of the tied pair can move the leader by an ulp."""
    away = (traj - traj[-1]).norm(dim=-1) > tol  # (layers+1, T)
    layers = traj.shape[0] - 1
    return torch.where(away, torch.arange(layers + 1).unsqueeze(-1) + 1, 0).amax(0)  # 0 = never away


def analyse(case: Case, sim: Simulation, index: int = 0, tail_band=(1e-10, 1e-2)) -> Dict[str, object]:
    """The checks of one simulated configuration (``index`` into the batch)."""
    traj, lead = sim.traj[:, index], sim.leaders[:, index]  # (layers+1, T, d), (layers, T)
    layers, n, d = traj.shape[0] - 1, traj.shape[1], traj.shape[2]
    final = traj[-1]
    settled = settle_layer(traj)
    # the limit leader of token i: among the tokens it attends to in the last layer (computed here,
    # not by the op), the one that settled first. A follower still on its way points at its target;
    # a collapsed cluster (exact ties) points at the member that stopped moving first.
    z_in = traj[-2]
    scores = (z_in if case.A is None else z_in @ case.A) @ z_in.T  # (T, T)
    sets = scores >= scores.amax(-1, keepdim=True)
    limit_leader = torch.tensor([int(m[settled[m].argmin()]) for m in (row.nonzero().flatten() for row in sets)])
    leader_tokens = limit_leader.unique().tolist()
    dist_t = (traj - traj[:, limit_leader]).norm(dim=-1).amax(-1)  # (layers+1,) max over tokens
    max_dist = float(dist_t[-1])
    within = (dist_t < TOL).nonzero().flatten()
    layers_to_tol = int(within[0]) if len(within) and bool((dist_t[within[0]:] < TOL).all()) else None
    # limit points: the leader tokens' final positions, one per place (tokens an ulp apart may each
    # lead themselves); the earliest-settled token represents a place
    kept: List[int] = []
    for j in sorted(leader_tokens, key=lambda j: (int(settled[j]), j)):
        if all(float((final[j] - final[k]).norm()) >= TOL for k in kept):
            kept.append(j)
    leader_tokens = sorted(kept)
    points = final[torch.tensor(leader_tokens)]
    equilibrium = bool(strict_leaders(points, case.A).all()) if len(points) > 1 else True
    fixed = float((traj[-1] - traj[-2]).abs().max())

    initial = lead[0].nonzero().flatten().tolist()
    at_initial = torch.cdist(points, traj[0][initial]).amin(-1) < TOL if initial else torch.zeros(len(points), dtype=torch.bool)
    new = [j for j, ok in zip(leader_tokens, at_initial.tolist()) if not ok]
    emerged = {}
    for j in new:
        # first layer from which token j is in its own attention set for good
        never_after = (~lead[:, j]).nonzero().flatten()
        emerged[j] = int(never_after[-1]) + 1 if len(never_after) else 0
    lost = [j for j in initial if j not in leader_tokens and float((traj[-1, j] - traj[0, j]).norm()) > TOL]

    # tail contraction: distance to the own limit, for tokens still moving
    to_limit = (traj - final).norm(dim=-1)  # (layers+1, T)
    lo, hi = tail_band
    now, nxt = to_limit[:-1], to_limit[1:]
    keep = (now > lo) & (now < hi)
    keep[:5] = False
    ratios = (nxt[keep] / now[keep]) if bool(keep.any()) else torch.empty(0, dtype=torch.float64)
    expected = 1 / (1 + case.alpha)
    dev = float((ratios / expected - 1).abs().max()) if len(ratios) else math.nan
    return {
        "case": case.name, "kind": case.kind, "tokens": n, "d": d, "A": case.a_kind, "alpha": case.alpha,
        "layers": layers, "initial_leaders": len(initial), "limit_points": len(points),
        "max_dist_to_limit_leader": max_dist, "layers_to_1e-9": layers_to_tol,
        "equilibrium": equilibrium, "last_step": fixed,
        "converged": max_dist < TOL and equilibrium and fixed < 1e-12,
        "tail_ratio_median": float(ratios.median()) if len(ratios) else math.nan,
        "tail_ratio_min": float(ratios.min()) if len(ratios) else math.nan,
        "tail_ratio_max": float(ratios.max()) if len(ratios) else math.nan,
        "expected_ratio": expected, "tail_ratio_max_rel_dev": dev, "tail_samples": int(len(ratios)),
        "limit_is_initial_leaders": not new and not lost,
        "new_leaders": " ".join(f"{j}@{emerged[j]}" for j in new),
        "lost_leaders": " ".join(map(str, lost)),
        "note": case.note,
    }  # fmt: skip


# --- the configurations -------------------------------------------------------------------------


def small_cases() -> List[Case]:
    """Hand-made configurations in R^2 in the spirit of the paper's figures (not copies of them)."""
    f64 = dict(dtype=torch.float64)
    angles = torch.tensor([90.0, 210.0, 330.0], **f64) * math.pi / 180
    vertices = 2.0 * torch.stack([angles.cos(), angles.sin()], -1)
    inner = torch.tensor([[0.3, 0.9], [-0.2, 1.1], [-0.9, -0.2], [-0.7, -0.6], [0.8, -0.4], [0.5, -0.7]], **f64)
    triangle = torch.cat([vertices, inner])
    chain = torch.tensor([[-0.30, -1.12], [0.03, 1.56], [1.54, -1.16], [0.24, -1.36]], **f64)
    tie = torch.tensor([[2.0, 1.0], [-2.0, 1.0], [0.0, 0.5]], **f64)
    return [
        Case("triangle", triangle, 1.0, kind="small", note="3 leaders at the vertices, 6 followers inside"),
        Case("chain", chain, 1.0, kind="small",
             note="token 0 follows token 3, which follows leader 2; token 0 is left behind and leads itself"),
        Case("seed13_n20", random_points(20, 2, 13), 1.0, kind="small",
             note="the counter-example of tests/ops: 20 normal points in R^2, seed 13"),
        Case("symmetric_tie", tie, 1.0, kind="small",
             note="not in general position: token 2 ties between two leaders and stops at their midpoint"),
    ]  # fmt: skip


def random_cases(seeds: Sequence[int] = (0, 1), dims: Sequence[int] = (2, 3), alphas=(0.5, 1.0, 2.0), n: int = 20) -> List[Case]:
    cases = []
    for d in dims:
        for a_kind in ("I", "spd"):
            for seed in seeds:
                for alpha in alphas:
                    A = random_spd(d, 200 + seed) if a_kind == "spd" else None
                    cases.append(Case(f"random_d{d}_{a_kind}_s{seed}_a{alpha:g}", random_points(n, d, 100 + seed), alpha,
                                      A=A, a_kind=a_kind))  # fmt: skip
    return cases


def population(dims=(2, 3, 8, 16), count: int = 200, n: int = 20, alpha: float = 1.0, layers: int = 200) -> List[dict]:
    """Per (d, A): how many of ``count`` random configurations converge, and onto the initial leaders."""
    rows = []
    for d in dims:
        for a_kind in ("I", "spd"):
            A = random_spd(d, 999) if a_kind == "spd" else None
            z0 = torch.stack([random_points(n, d, 10_000 + i) for i in range(count)])  # (count, n, d)
            sim = simulate(z0, alpha, A, layers)
            case = Case("population", z0[0], alpha, A=A, a_kind=a_kind)
            results = [analyse(case, sim, index=i) for i in range(count)]
            conv = sum(r["converged"] for r in results)
            initial = sum(r["limit_is_initial_leaders"] for r in results)
            rows.append({"d": d, "A": a_kind, "alpha": alpha, "tokens": n, "configurations": count, "converged": conv,
                         "limit_is_initial_leaders": initial, "new_leaders_emerged": count - initial,
                         "mean_limit_points": round(sum(r["limit_points"] for r in results) / count, 2),
                         "mean_initial_leaders": round(sum(r["initial_leaders"] for r in results) / count, 2),
                         "max_layers_to_1e-9": max(layers + 1 if r["layers_to_1e-9"] is None else r["layers_to_1e-9"]
                                                 for r in results)})  # fmt: skip
            print(f"[dynamics] population d={d} A={a_kind}: {conv}/{count} converged, {count - initial} grew new leaders",
                  file=sys.stderr, flush=True)  # fmt: skip
    return rows


# --- output -------------------------------------------------------------------------------------


def write_table(rows: List[dict], csv_path: Path, md_path: Path, columns: Optional[List[str]] = None) -> None:
    columns = columns or list(rows[0])
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if (v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4)) else f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")


def _pyplot():
    import logging

    for name in ("matplotlib", "PIL"):  # fairseq's logging setup would print their debug chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_trajectories(case: Case, sim: Simulation, row: dict, path: Path) -> None:
    plt = _pyplot()
    traj = sim.traj[:, 0].numpy()  # (layers+1, T, 2)
    lead0 = sim.leaders[0, 0].numpy()
    fig, ax = plt.subplots(figsize=(5.2, 5.2))
    for i in range(traj.shape[1]):
        ax.plot(traj[:, i, 0], traj[:, i, 1], "-", color="0.6", lw=0.8, zorder=1)
    ax.scatter(traj[0, :, 0], traj[0, :, 1], s=22, c="tab:blue", label="tokens at layer 0", zorder=2)
    ax.scatter(traj[0, lead0, 0], traj[0, lead0, 1], s=140, marker="*", c="gold", edgecolors="k",
               label="initial leaders", zorder=3)  # fmt: skip
    ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=60, marker="x", c="tab:red", label=f"layer {traj.shape[0] - 1}", zorder=4)
    for item in filter(None, row["new_leaders"].split()):
        j = int(item.split("@")[0])
        ax.scatter(traj[-1, j, 0], traj[-1, j, 1], s=220, facecolors="none", edgecolors="tab:green", lw=2,
                   label="new leader" if "new leader" not in ax.get_legend_handles_labels()[1] else None, zorder=5)  # fmt: skip
    for i in range(traj.shape[1]):
        ax.annotate(str(i), traj[0, i], fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_title(f"{case.name}: alpha={case.alpha:g}, A={case.a_kind}\n{row['limit_points']} limit points, "
                 f"{row['initial_leaders']} initial leaders", fontsize=9)  # fmt: skip
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def animate(case: Case, sim: Simulation, path: Path, frames: int = 12) -> None:
    plt = _pyplot()
    from matplotlib.animation import FuncAnimation, PillowWriter

    traj = sim.traj[:, 0].numpy()
    leaders = sim.leaders[:, 0].numpy()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    pad = 0.2
    ax.set_xlim(traj[..., 0].min() - pad, traj[..., 0].max() + pad)
    ax.set_ylim(traj[..., 1].min() - pad, traj[..., 1].max() + pad)
    ax.set_aspect("equal")
    dots = ax.scatter(traj[0, :, 0], traj[0, :, 1], s=25, c="tab:blue")
    title = ax.set_title("")

    def draw(t):
        dots.set_offsets(traj[t])
        colors = ["gold" if leaders[min(t, len(leaders) - 1), i] else "tab:blue" for i in range(traj.shape[1])]
        dots.set_color(colors)
        title.set_text(f"{case.name}, layer {t} (gold: leaders)")
        return dots, title

    anim = FuncAnimation(fig, draw, frames=range(min(frames, traj.shape[0])), blit=False)
    anim.save(path, writer=PillowWriter(fps=2))
    plt.close(fig)


COLUMNS = ["case", "tokens", "d", "A", "alpha", "initial_leaders", "limit_points", "max_dist_to_limit_leader",
           "layers_to_1e-9", "equilibrium", "converged", "tail_ratio_median", "tail_ratio_max_rel_dev", "expected_ratio",
           "limit_is_initial_leaders", "new_leaders"]  # fmt: skip


def run(out: Path, layers: int = 200, population_count: int = 200) -> Dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(exist_ok=True)
    started = time.time()
    cases = small_cases() + random_cases()
    rows = []
    for number, case in enumerate(cases, 1):
        sim = simulate(case.z0, case.alpha, case.A, layers)
        row = analyse(case, sim)
        rows.append(row)
        verdict = "initial leaders" if row["limit_is_initial_leaders"] else f"new leaders {row['new_leaders']}"
        print(f"[dynamics] {number}/{len(cases)} {case.name}: converged={row['converged']}, {row['limit_points']} limit "
              f"points, tail ratio {row['tail_ratio_median']:.4f} (1/(1+alpha) = {row['expected_ratio']:.4f}), {verdict}",
              file=sys.stderr, flush=True)  # fmt: skip
        if case.z0.shape[1] == 2 and (case.kind == "small" or (case.a_kind == "I" and case.alpha == 1.0)):
            plot_trajectories(case, sim, row, out / "plots" / f"{case.name}.png")
            if not row["limit_is_initial_leaders"]:
                animate(case, sim, out / "plots" / f"{case.name}.gif")
    paths = {"csv": out / "dynamics.csv", "md": out / "dynamics.md"}
    write_table(rows, paths["csv"], paths["md"], COLUMNS)
    if population_count:
        pop = population(count=population_count, layers=layers)
        paths["population_csv"], paths["population_md"] = out / "population.csv", out / "population.md"
        write_table(pop, paths["population_csv"], paths["population_md"])
    print(f"[dynamics] wrote {out} in {time.time() - started:.1f} s", file=sys.stderr)
    return paths


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/hardmax/dynamics"))
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--population", type=int, default=200, help="random configurations per (d, A); 0 = skip")
    args = parser.parse_args(argv)
    if args.layers < 10:
        sys.exit("error: --layers must be >= 10 (the tail needs room)")
    torch.set_num_threads(1)  # everything here is tiny: threads cost more than they save
    run(args.out, args.layers, args.population)


if __name__ == "__main__":
    main()
