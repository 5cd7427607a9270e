"""Chunked, sharded and streamed simulation: subjects in chunks, chunk c simulated by rank ``c % world``, each
chunk's output written to its own part file (atomically), a ``manifest.json`` by rank 0, and the small
per-subject tables (exposures) summed over the ranks so every rank holds them all.

**Reproducibility rule (per-chunk seeds).** Chunk 0 draws from a generator seeded with ``seed`` itself, chunk
c ≥ 1 from one seeded with ``np.random.SeedSequence([seed, c])`` (:func:`chunk_seed`). A chunk's content is a
function of the data, the seed, the chunk size and c only, so every part file is identical, byte for byte,
whatever the number of ranks; a run that fits in one chunk reproduces the in-memory (unchunked) result exactly.
Without a seed, rank 0 draws one and shares it (:func:`shared_seed`); the manifest records it.

**Layout of an output folder.** ``part-00000.csv`` … (``simulate``; ``.parquet`` with ``format="parquet"``,
which needs pyarrow) or ``profiles-part-00000.csv`` … (``simulate_regimens``: REGIMEN, ID, DRAW, TIME, CONC),
in chunk order, and ``manifest.json`` (the parts, their row counts, the seed and the chunk size). Part files of
the same kind left in the folder by an earlier run and not written by this one are removed, so the folder always
describes one run.

The collectives used here (a barrier, the sum of zero-filled arrays each row of which one rank filled) are
small helpers over :meth:`nlmefit.parallel.Shard.allreduce_sum`.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from nlmefit import parallel
from nlmefit._io import atomic_write
from nlmefit.errors import ModelSpecError
from nlmefit.memory import subject_slices
from nlmefit.models.model import Model, ModelData
from nlmefit.models.parameters import Params
from nlmefit.panel import Panel
from nlmefit.progress import progress_bar
from nlmefit.simulation.exposure import exposure_table
from nlmefit.simulation.population import SimulatedPopulation

__all__ = ["StreamedSimulation", "FORMATS", "check_format", "chunk_seed", "shared_seed", "chunk_slices",
           "default_chunk_size", "simulate_chunks", "regimen_chunks", "read_parts", "GATHER_LIMIT", "TARGET_VALUES"]

#: part file formats (parquet needs pyarrow)
FORMATS = ("csv", "parquet")
#: predicted values per chunk that the default chunk size aims at
TARGET_VALUES = 4_000_000
#: most profile values [R, S, T] gathered onto every rank (regimen simulation)
GATHER_LIMIT = 200_000_000


@dataclass(frozen=True)
class StreamedSimulation:
    """What a streamed :func:`nlmefit.simulate` wrote into ``out``: the part files (chunk order), the manifest,
    the number of rows in all parts, replicates, chunks, the chunk size (subjects), the format and the seed."""

    out: Path
    parts: list[Path]
    manifest: Path
    n_rows: int
    n_replicates: int
    n_chunks: int
    chunk_size: int
    format: str
    seed: int

    def read(self) -> pd.DataFrame:
        """All parts concatenated in chunk order (in memory: for checks and small runs)."""
        return read_parts(self.parts, self.format)


def read_parts(parts: Sequence[str | os.PathLike], format: str = "csv") -> pd.DataFrame:
    """The part files concatenated in the given order."""
    reader = pd.read_parquet if format == "parquet" else pd.read_csv
    return pd.concat([reader(p) for p in parts], ignore_index=True)


def check_format(format: str) -> str:
    """``format`` if it is a part format this installation can write (parquet needs pyarrow)."""
    if format not in FORMATS:
        raise ModelSpecError(f"format must be 'csv' or 'parquet', got {format!r}")
    if format == "parquet":
        try:
            import pyarrow  # noqa: F401  (only probed: pandas writes parquet through it)
        except ImportError:
            raise ModelSpecError("format='parquet' needs pyarrow (pip install pyarrow); use format='csv'") from None
    return format


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of chunk ``chunk``'s generator: ``seed`` itself for chunk 0, else 63 bits of
    ``np.random.SeedSequence([seed, chunk])``."""
    if chunk == 0:
        return int(seed)
    state = np.random.SeedSequence([int(seed) % 2 ** 64, int(chunk)]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def shared_seed(seed: int | None, shard: parallel.Shard | None) -> int:
    """``seed``, or (None) a random seed drawn from torch's global generator — by rank 0 and shared with all."""
    if seed is not None:
        return int(seed)
    drawn = int(torch.randint(0, 2 ** 62, ()).item())
    if shard is None:
        return drawn
    mine = torch.tensor([drawn if shard.rank == 0 else 0], dtype=torch.int64)
    return int(shard.allreduce_sum(mine).item())


def chunk_slices(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` of ``range(n)``."""
    if size < 1:
        raise ModelSpecError(f"chunk_size must be a positive number of subjects, got {size}")
    return subject_slices(n, size) if n else []


def default_chunk_size(values_per_subject: float) -> int:
    """Subjects per chunk so that a chunk holds about :data:`TARGET_VALUES` values."""
    return max(1, int(TARGET_VALUES // max(1.0, float(values_per_subject))))


def _mine(n_chunks: int, shard: parallel.Shard | None) -> list[int]:
    """The chunks this rank simulates: c with c % world == rank (all of them in one process)."""
    return list(range(n_chunks)) if shard is None else list(range(shard.rank, n_chunks, shard.world))


def _reduce(arr: np.ndarray, shard: parallel.Shard | None) -> np.ndarray:
    """The sum over ranks of ``arr`` (zero where another rank fills it); ``arr`` itself in one process."""
    if shard is None:
        return arr
    return shard.allreduce_sum(torch.from_numpy(np.ascontiguousarray(arr))).numpy()


def _generator(seed: int, chunk: int, device, first: torch.Generator | None = None) -> torch.Generator:
    """Chunk ``chunk``'s generator (``first`` for chunk 0 when given: the caller's own, already seeded)."""
    if chunk == 0 and first is not None:
        return first
    gen = torch.Generator(device=device if device is not None else "cpu")
    gen.manual_seed(chunk_seed(seed, chunk))
    return gen


def _out_folder(out: str | os.PathLike) -> Path:
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ModelSpecError(f"out={str(out)!r} exists and is not a folder; give a folder for the part files")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _write_part(frame: pd.DataFrame, path: Path, format: str) -> None:
    if format == "parquet":
        atomic_write(path, lambda fh: frame.to_parquet(fh, index=False), binary=True)
    else:
        atomic_write(path, lambda fh: frame.to_csv(fh, index=False))


def _finish(folder: Path, prefix: str, format: str, rows: np.ndarray, meta: dict,
            shard: parallel.Shard | None) -> tuple[list[Path], Path, np.ndarray]:
    """After every rank wrote its parts: rows per part summed over ranks (a barrier too), then rank 0 writes
    ``manifest.json`` and removes stale parts of this kind; a second barrier so every rank returns after it."""
    rows = _reduce(rows.astype(np.int64), shard)
    names = [f"{prefix}-{c:05d}.{format}" for c in range(len(rows))]
    manifest = folder / "manifest.json"
    if shard is None or shard.rank == 0:
        pattern = re.compile(rf"^{re.escape(prefix)}-\d{{5}}\.(csv|parquet)$")
        for p in folder.iterdir():
            if pattern.match(p.name) and p.name not in names:
                p.unlink()
        doc = {**meta, "format": format, "n_chunks": len(names), "n_rows": int(rows.sum()),
               "parts": [{"file": n, "rows": int(r)} for n, r in zip(names, rows)]}
        atomic_write(manifest, lambda fh: json.dump(doc, fh, indent=1))
    if shard is not None:
        shard.allreduce_sum(torch.zeros(1))
    return [folder / n for n in names], manifest, rows


# ---------------------------------------------------------------------------------------------- simulate
def _record_chunks(panel: Panel, n_rows: int, bounds: np.ndarray) -> np.ndarray:
    """The chunk of every record of the user's frame: that of its subject (observation and dose rows); other
    records (no subject in the panel) follow the record before them."""
    subj_chunk = np.searchsorted(bounds, np.arange(panel.n_subjects), side="right") - 1
    owner = np.full(n_rows, -1, dtype=np.int64)
    for rows, mask in ((panel.obs_row, panel.obs_mask), (panel.dose_row, panel.dose_mask)):
        m = mask & (rows >= 0)
        owner[rows[m]] = np.broadcast_to(subj_chunk[:, None], rows.shape)[m]
    s = pd.Series(owner, dtype=float).where(owner >= 0).ffill().fillna(0.0)
    return s.to_numpy().astype(np.int64)


def simulate_chunks(model: Model, p: Params, panel: Panel, frame: pd.DataFrame, mdata: ModelData, *, n: int,
                    seed: int | None, residual: bool, other_endpoints: str, out: str | os.PathLike,
                    chunk_size: int | None, format: str, progress: bool | None) -> StreamedSimulation:
    """The body of ``nlmefit.simulate(..., out=...)``: subjects in chunks (chunk c on rank c % world), each
    chunk's ``n`` replicates of its subjects' records written to ``out/part-XXXXX.<format>``."""
    check_format(format)
    shard = parallel.current()
    folder = _out_folder(out)
    seed = shared_seed(seed, shard)
    base = frame.reset_index(drop=True)
    n_subj = mdata.n_subjects
    size = int(chunk_size) if chunk_size is not None else default_chunk_size(n * len(base) / max(1, n_subj))
    slices = chunk_slices(n_subj, size)
    bounds = np.array([sl.start for sl in slices])
    owner = _record_chunks(panel, len(base), bounds)
    order = np.argsort(owner, kind="stable")
    cuts = np.searchsorted(owner[order], np.arange(len(slices) + 1))
    dv_col = panel.columns.get("DV", "DV") if hasattr(panel, "columns") else "DV"
    base_dv = base[dv_col].to_numpy(float) if dv_col in base else np.full(len(base), np.nan)
    mk_all = mdata.mask.cpu().numpy()
    mine = _mine(len(slices), shard)
    rows_written = np.zeros(len(slices), dtype=np.int64)
    bar = progress_bar(len(mine), "simulate", "chunk", enabled=progress if shard is None or shard.rank == 0
                       else False, leave=False)
    for c in mine:  # chunks: each one batched tensor program over its subjects and the n replicates
        sl = slices[c]
        gen = _generator(seed, c, mdata.y.device)
        part = mdata.index(sl)
        with torch.no_grad():
            eta = model.sample_eta(p, part.n_subjects, part.n_occ, generator=gen, size=(n,))
            y = model.sample_y(p, eta, part, generator=gen, residual=residual).cpu().numpy()  # [n, S_c, J]
        rows = np.sort(order[cuts[c]:cuts[c + 1]])  # the chunk's records, in the user's order
        mk = mk_all[sl]
        dv = np.tile(base_dv[rows], (n, 1))
        dv[:, np.searchsorted(rows, panel.obs_row[sl][mk])] = y[:, mk]
        keep = np.ones(len(rows), dtype=bool)
        if other_endpoints == "drop":
            keep &= ~np.isin(rows, panel.obs_row[sl][panel.obs_mask[sl] & ~mk])
        f = base.iloc[rows[keep]]
        f = f.iloc[np.tile(np.arange(len(f)), n)].reset_index(drop=True)
        f[dv_col] = dv[:, keep].reshape(-1)
        f.insert(0, "REP", np.repeat(np.arange(1, n + 1), int(keep.sum())))
        _write_part(f, folder / f"part-{c:05d}.{format}", format)
        rows_written[c] = len(f)
        bar.update(1)
    bar.close()
    meta = {"kind": "simulate", "seed": seed, "n_replicates": n, "n_subjects": n_subj, "chunk_size": size,
            "columns": ["REP", *[str(c) for c in base.columns if c != "REP"]]
            + ([dv_col] if dv_col not in base else [])}
    parts, manifest, rows = _finish(folder, "part", format, rows_written, meta, shard)
    return StreamedSimulation(folder, parts, manifest, int(rows.sum()), n, len(slices), size, format, seed)


# ---------------------------------------------------------------------------------------------- regimens
def regimen_chunks(pops: list[SimulatedPopulation], labels: list[str], grid: np.ndarray,
                   windows: list[tuple[float, float]], windows24: list, ids: np.ndarray, draw: np.ndarray, *,
                   gen: torch.Generator, seed: int, chunk_size: int | None, chunk: int, residual: bool,
                   allow_negative: bool, exposure_options: dict, out: str | os.PathLike | None, format: str,
                   progress: bool | None) -> tuple[np.ndarray, list[pd.DataFrame]]:
    """Profiles [R, S, T] and the exposure tables (one per regimen, S rows, unlabelled) of the simulated subjects
    of ``pops`` (one SimulatedPopulation per regimen, the same S subjects), chunk by chunk over the ranks.

    Chunk c (subjects ``c·chunk_size`` …) is simulated by rank c % world; its residual draws come from ``gen``
    (chunk 0; the caller's generator, after the subjects were drawn) or from :func:`chunk_seed` (``seed``, c).
    The exposures are summed over ranks (every row filled by one rank) so every rank holds all of them; so are
    the profiles when R·S·T ≤ :data:`GATHER_LIMIT` (always in one process without ``out``). Larger runs over
    ranks need ``out``; with ``out`` they are in the part files and the returned array holds the first
    ⌊GATHER_LIMIT/(R·T)⌋ subjects (with a warning).
    With ``out`` each chunk's profiles go to ``out/profiles-part-XXXXX.<format>`` (REGIMEN, ID, DRAW, TIME, CONC).
    """
    if out is not None:
        check_format(format)
    shard = parallel.current()
    folder = _out_folder(out) if out is not None else None
    R, S, T = len(pops), pops[0].n, len(grid)
    size = int(chunk_size) if chunk_size is not None else default_chunk_size(R * T)
    slices = chunk_slices(S, size)
    keep = S
    if R * S * T > GATHER_LIMIT and (shard is not None or out is not None):  # one process in memory: all kept
        if out is None:
            raise ModelSpecError(f"{R} regimens × {S} subjects × {T} times is too large to hold on every rank; "
                                 f"pass out= (a folder) to stream the profiles to disk")
        keep = max(1, GATHER_LIMIT // (R * T))
        warnings.warn(f"the profiles of {S} subjects are in the part files in {folder}; the returned profiles (and "
                      f"quantiles()) hold the first {keep} subjects only", stacklevel=3)
    layout = [exposure_table(pop.rows(slice(0, 1)), w, auc24=w24, chunk=chunk, **exposure_options)
              for pop, w, w24 in zip(pops, windows, windows24)]  # column names and texts of each table
    numeric = [list(t.select_dtypes("number").columns) for t in layout]
    values = [np.zeros((S, len(cols))) for cols in numeric]
    profiles = np.zeros((R, keep, T))
    mine = _mine(len(slices), shard)
    rows_written = np.zeros(len(slices), dtype=np.int64)
    bar = progress_bar(len(mine) * R, "regimens", "regimen", enabled=progress if shard is None or shard.rank == 0
                       else False, leave=False)
    for c in mine:  # chunks of subjects; inside, a handful of regimens: neither is a hot loop
        sl = slices[c]
        g = _generator(seed, c, gen.device, first=gen)
        inside = sl.stop <= keep  # the chunk's profiles are written straight into the returned array
        block = profiles[:, sl] if inside else np.empty((R, sl.stop - sl.start, T))
        for r, pop in enumerate(pops):
            bar.set_postfix_str(labels[r][:40], refresh=False)
            sub = pop.rows(sl)
            block[r] = sub.concentrations(grid, chunk, residual, g, allow_negative)
            ex = exposure_table(sub, windows[r], auc24=windows24[r], chunk=chunk, **exposure_options)
            values[r][sl] = ex[numeric[r]].to_numpy(float)
            bar.update(1)
        if not inside and sl.start < keep:
            profiles[:, sl.start:min(sl.stop, keep)] = block[:, :keep - sl.start]
        if folder is not None:
            n_c = sl.stop - sl.start
            frame = pd.DataFrame({
                "REGIMEN": np.repeat(np.asarray(labels, dtype=object), n_c * T),
                "ID": np.tile(np.repeat(ids[sl], T), R),
                "DRAW": np.tile(np.repeat(draw[sl], T), R),
                "TIME": np.tile(grid, R * n_c),
                "CONC": block.reshape(-1)})
            _write_part(frame, folder / f"profiles-part-{c:05d}.{format}", format)
            rows_written[c] = len(frame)
    bar.close()
    tables = []
    for t, cols, v in zip(layout, numeric, values):
        v = _reduce(v, shard)
        df = t.iloc[np.zeros(S, dtype=np.int64)].reset_index(drop=True)
        for k, col in enumerate(cols):
            df[col] = v[:, k]
        tables.append(df)
    profiles = _reduce(profiles, shard)
    if folder is not None:
        meta = {"kind": "regimens", "seed": seed, "regimens": list(labels), "n_subjects": S, "n_times": T,
                "chunk_size": size, "columns": ["REGIMEN", "ID", "DRAW", "TIME", "CONC"]}
        _finish(folder, "profiles-part", format, rows_written, meta, shard)
    return profiles, tables
