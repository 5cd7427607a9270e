"""The panel view of the baselines (common design, context, standardisation with its Jacobian) and the shared
trainer (early stopping, best-state restore, checkpoint/resume reproducing an uninterrupted run)."""
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from nlmefit.baselines import Baseline, PanelView, Phase, Standardizer, Trainer
from nlmefit.errors import DataError, ModelSpecError


def _frame(n=6, times=(0.5, 1.0, 2.0, 4.0), amt=100.0, extra=None):
    rows = []
    for i in range(1, n + 1):
        rows.append({"ID": i, "TIME": 0.0, "AMT": amt, "EVID": 1, "DV": np.nan, "WT": 60.0 + i})
        for t in times:
            rows.append({"ID": i, "TIME": t, "AMT": 0.0, "EVID": 0, "DV": float(i * 10 + t), "WT": 60.0 + i})
    if extra:
        rows += extra
    return pd.DataFrame(rows).sort_values(["ID", "TIME"], kind="stable").reset_index(drop=True)


def test_view_of_a_common_design():
    v = PanelView.from_panel(_frame())
    assert v.n == 6 and v.d == 4 and v.mask.all()
    np.testing.assert_array_equal(v.times, [0.5, 1, 2, 4])
    np.testing.assert_allclose(v.y[1], [20.5, 21, 22, 24])
    np.testing.assert_allclose(v.context, 100.0)
    assert v.regimen is not None and list(v.regimen["AMT"]) == [100.0]
    assert list(v.covariates.columns) == ["WT"]


def test_missing_design_time_is_masked_and_off_design_time_refused():
    df = _frame()
    df = df[~((df.ID == 2) & (df.TIME == 1.0))]
    v = PanelView.from_panel(df)
    assert not v.mask[1, 1] and np.isnan(v.y[1, 1]) and v.mask.sum() == 23
    assert v.complete().n == 5
    df2 = _frame(extra=[{"ID": 3, "TIME": 3.3, "AMT": 0.0, "EVID": 0, "DV": 1.0, "WT": 63.0}])
    with pytest.raises(DataError, match="not a common design: TIME 3.3"):
        PanelView.from_panel(df2)
    with pytest.raises(DataError, match="ID 3: observation at TIME 3.3 is not a design time"):
        PanelView.from_panel(df2, times=[0.5, 1, 2, 4])


def test_different_regimens_need_the_context_path():
    df = pd.concat([_frame(3), _frame(3, amt=300.0).assign(ID=lambda d: d.ID + 3)])
    with pytest.raises(DataError, match="ID 4 receives a different regimen from ID 1"):
        PanelView.from_panel(df)
    v = PanelView.from_panel(df, common_regimen=False)
    assert v.regimen is None
    np.testing.assert_allclose(v.context[:, 0], [100, 100, 100, 300, 300, 300])


def test_multiple_dose_context_is_cumulative():
    df = _frame(2, times=(1.0, 13.0, 20.0))
    df = pd.concat([df, pd.DataFrame([{"ID": i, "TIME": 12.0, "AMT": 50.0, "EVID": 1, "DV": np.nan, "WT": 61.0}
                                      for i in (1, 2)])]).sort_values(["ID", "TIME"], kind="stable")
    v = PanelView.from_panel(df)
    np.testing.assert_allclose(v.context[0], [100, 150, 150])


def test_split_is_by_subject_and_seeded():
    v = PanelView.from_arrays(np.arange(40.0).reshape(10, 4))
    tr, te = v.split(0.3, seed=1)
    assert tr.n == 7 and te.n == 3 and not set(tr.ids) & set(te.ids)
    tr2, _ = v.split(0.3, seed=1)
    np.testing.assert_array_equal(tr.ids, tr2.ids)
    with pytest.raises(DataError, match="test_fraction"):
        v.split(1.5)


def test_standardizer_jacobian():
    """log p_y(y) = log p_z(z) − Σ log s: a unit-variance Gaussian on z is N(m, s²) on y."""
    rng = np.random.default_rng(0)
    y = 5 + 3 * rng.standard_normal((200, 3)) * np.array([1, 2, 4])
    v = PanelView.from_arrays(y)
    s = Standardizer.fit(v)
    z = s.transform(y)
    from scipy.stats import norm

    lp_z = norm.logpdf(z).sum(1)
    lp_y = norm.logpdf(y, s.mean, s.scale).sum(1)
    np.testing.assert_allclose(lp_z - s.log_scale_sum(v.mask), lp_y, rtol=1e-12)
    np.testing.assert_allclose(s.inverse(z), y)
    flat = PanelView.from_arrays(np.ones((5, 2)))
    assert np.all(Standardizer.fit(flat).scale == 1.0)


class _Gauss(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.m, self.log_s = nn.Parameter(torch.full((d,), 2.0)), nn.Parameter(torch.zeros(d))

    def phases(self):
        return [Phase("model", list(self.parameters()))]

    def loss(self, batch, phase, gen):
        return -torch.distributions.Normal(self.m, self.log_s.exp()).log_prob(batch[0]).sum(-1).mean()


class _GaussBaseline(Baseline):
    name, kind = "gauss", "exact"

    def _fit(self, z, mask, ctx, valid):
        self.obj = _Gauss(z.shape[1])
        self._train(self.obj, (z,), None if valid is None else (valid[0],))

    def _sample(self, n, ctx, gen):
        return self.obj.m + self.obj.log_s.exp() * torch.randn(n, self.obj.m.numel(), generator=gen)

    def _log_prob(self, z, mask, ctx, gen):
        return torch.distributions.Normal(self.obj.m, self.obj.log_s.exp()).log_prob(z).sum(-1)


def test_trainer_reaches_the_mle_and_the_baseline_reports_the_raw_scale_density():
    rng = np.random.default_rng(1)
    y = 50 + 10 * rng.standard_normal((300, 2))
    tr, te = PanelView.from_arrays(y).split(0.3)
    from scipy.stats import norm

    ref = norm.logpdf(te.y, tr.y.mean(0), tr.y.std(0)).sum(1)
    b = _GaussBaseline(trainer_options=dict(max_epochs=300, lr=0.02, patience=None, batch_size=512)).fit(tr)
    assert np.abs(b.log_prob(te) - ref).max() < 0.01  # full-batch Adam on the training NLL: the MLE
    b = _GaussBaseline(trainer_options=dict(max_epochs=400, lr=0.05, patience=40)).fit(tr, te)
    h = b.history.frame()
    assert {"epoch", "train_loss", "valid_loss"} <= set(h.columns)
    assert b.history.best_loss == pytest.approx(h["valid_loss"].min())


def test_checkpoint_resume_gives_the_uninterrupted_run(tmp_path):
    y = np.random.default_rng(2).standard_normal((100, 2))
    z = (torch.as_tensor(y, dtype=torch.float32),)
    torch.manual_seed(0)
    a = _Gauss(2)
    Trainer(max_epochs=6, lr=0.05, patience=None, batch_size=32).fit(a, z)
    torch.manual_seed(0)
    b = _Gauss(2)
    ck = tmp_path / "ck.pt"
    Trainer(max_epochs=3, lr=0.05, patience=None, batch_size=32, checkpoint=ck).fit(b, z)
    c = _Gauss(2)
    hist = Trainer(max_epochs=6, lr=0.05, patience=None, batch_size=32, checkpoint=ck, resume=True).fit(c, z)
    assert len(hist.epochs) == 6
    torch.testing.assert_close(c.m, a.m)
    torch.testing.assert_close(c.log_s, a.log_s)
    with pytest.raises(ModelSpecError, match="does not fit"):
        Trainer(max_epochs=7, checkpoint=ck, resume=True).fit(_Gauss(3), (torch.zeros(4, 3),))


def test_baseline_boundary_errors():
    b = _GaussBaseline()
    with pytest.raises(ModelSpecError, match="call fit"):
        b.sample(3)
    with pytest.raises(DataError, match="expected a PanelView"):
        b.fit(np.zeros((3, 2)))
    y = np.ones((4, 2))
    y[1, 0] = np.nan
    with pytest.raises(DataError, match=r"subjects with missing values: \[2\]"):
        b.fit(PanelView.from_arrays(y))
    if not torch.cuda.is_available():
        with pytest.raises(ModelSpecError, match="cuda"):
            _GaussBaseline(device="cuda")
    with pytest.raises(ModelSpecError, match="lr must be positive"):
        Trainer(lr=0)


def test_restore_best_false_keeps_the_final_state():
    y = np.random.default_rng(3).standard_normal((64, 2)) + 1.0
    z = (torch.as_tensor(y, dtype=torch.float32),)
    torch.manual_seed(0)
    a = _Gauss(2)
    hist = Trainer(max_epochs=5, lr=2.0, patience=None, batch_size=64, restore_best=False).fit(a, z)
    torch.manual_seed(0)
    b = _Gauss(2)
    Trainer(max_epochs=5, lr=2.0, patience=None, batch_size=64).fit(b, z)
    assert len(hist.epochs) == 5 and hist.best_epoch == 0  # lr 2 overshoots: the first epoch is the best
    assert not torch.allclose(a.m, b.m)  # b restored epoch 0; a kept epoch 4
