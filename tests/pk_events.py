"""Test helper: padded ``Events`` written by hand, shared by the closed-form and ODE tests."""
from __future__ import annotations

import torch

from nlmefit.pk.events import Events

DT = torch.float64

__all__ = ["make_events"]


def make_events(subjects: list[dict]) -> Events:
    """Padded Events from per-subject ``dict(doses=[dict(time, amt, rate=0, route=0, ss=0, ii=0, obs_first=False,
    reset=False)], obs=[times], resets=[times])``. Records sort by time; at equal times resets come first, then doses,
    then observations (a dose with ``obs_first`` after the observations). SS=1 doses, ``reset`` doses (EVID 4) and
    ``resets`` (EVID 3) start a new epoch."""
    per = []
    for s in subjects:
        recs = [(d["time"], 2 if d.get("obs_first") else 0, "dose", d) for d in s.get("doses", [])]
        recs += [(t, 1, "obs", t) for t in s.get("obs", [])]
        recs += [(t, -1, "reset", t) for t in s.get("resets", [])]
        recs.sort(key=lambda r: (r[0], r[1]))
        epoch, doses, obs = 0, [], []
        for seq, (t, _, kind, payload) in enumerate(recs):
            if kind == "reset":
                epoch += 1
            elif kind == "dose":
                if payload.get("ss", 0) == 1 or payload.get("reset"):
                    epoch += 1
                doses.append((payload, seq, epoch))
            else:
                obs.append((t, seq, epoch))
        per.append((doses, obs))
    n = len(subjects)
    j = max(1, max(len(o) for _, o in per))
    d = max(1, max(len(ds) for ds, _ in per))

    def z(dtype=DT):
        return torch.zeros(n, j, dtype=dtype)

    def zd(dtype=DT):
        return torch.zeros(n, d, dtype=dtype)

    out = dict(obs_time=z(), obs_mask=z(torch.bool), obs_seq=z(torch.int64), obs_epoch=z(torch.int64),
               dose_time=zd(), dose_amt=zd(), dose_rate=zd(), dose_dur=zd(), dose_ss=zd(torch.int64), dose_ii=zd(),
               dose_route=zd(torch.int64), dose_mask=zd(torch.bool), dose_seq=zd(torch.int64),
               dose_epoch=zd(torch.int64))
    for i, (doses, obs) in enumerate(per):
        for k, (t, seq, ep) in enumerate(obs):
            out["obs_time"][i, k], out["obs_mask"][i, k] = t, True
            out["obs_seq"][i, k], out["obs_epoch"][i, k] = seq, ep
        for k, (dd, seq, ep) in enumerate(doses):
            rate = dd.get("rate", 0.0)
            out["dose_time"][i, k], out["dose_amt"][i, k], out["dose_rate"][i, k] = dd["time"], dd["amt"], rate
            out["dose_dur"][i, k] = dd["amt"] / rate if rate > 0 else 0.0
            out["dose_ss"][i, k], out["dose_ii"][i, k] = dd.get("ss", 0), dd.get("ii", 0.0)
            out["dose_route"][i, k], out["dose_mask"][i, k] = dd.get("route", 0), True
            out["dose_seq"][i, k], out["dose_epoch"][i, k] = seq, ep
    return Events(**out)
