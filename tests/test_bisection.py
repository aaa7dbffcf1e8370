"""Target mode's threshold search (mipp.methods.bisection) on passes with known answers."""

from types import SimpleNamespace

import torch

from mipp.methods.bisection import bisect_threshold


def _fake_run(deltas: torch.Tensor, *, rise: float = 0.0, step: float = 0.0):
    """A selection pass over units with relative Δs ``deltas``: a unit goes when its Δ, which
    rises by ``rise`` × (share already removed) as others leave, is ≤ τ. ``step`` > 0 makes
    the achieved sparsity jump in blocks of that size (coarse granularity)."""
    calls = []

    def run(tau):
        calls.append(tau)
        order = torch.sort(deltas).indices
        keep = torch.ones(len(deltas), dtype=torch.bool)
        seen = torch.full_like(deltas, float("nan"))
        for i in order.tolist():
            d = deltas[i] * (1 + rise * float((~keep).float().mean()))
            seen[i] = d
            if d <= tau:
                keep[i] = False
        share = float((~keep).float().mean())
        if step:
            share = step * round(share / step)
        res = [SimpleNamespace(relative_deltas=seen, support=keep)]
        return [keep], res, {"units": share}

    return run, calls


def test_non_interacting_deltas_are_hit_by_the_first_guess():
    deltas = 10.0 ** torch.linspace(-6, -1, 200, dtype=torch.float64)
    run, calls = _fake_run(deltas)
    trace = []
    kept, _, ach, _tau = bisect_threshold(run, 0.37, "units", 0.005, trace)
    assert abs(ach["units"] - 0.37) <= 0.005
    assert len(calls) == 2  # τ = 0, then the quantile guess is already right
    assert len(trace) == 2 and trace[0]["threshold"] == 0.0
    assert int((~kept[0]).sum()) == 74


def test_interacting_deltas_converge_in_a_few_passes():
    g = torch.Generator().manual_seed(0)
    deltas = torch.rand(500, generator=g, dtype=torch.float64) ** 4
    for target in (0.1, 0.5, 0.9):
        run, calls = _fake_run(deltas, rise=3.0)
        _, _, ach, _ = bisect_threshold(run, target, "units", 0.01, [])
        assert abs(ach["units"] - target) <= 0.01
        assert len(calls) <= 10


def test_zero_threshold_enough_and_unreachable_precision_terminate():
    deltas = torch.cat([torch.zeros(50), torch.linspace(0.01, 1, 50)]).double()
    run, calls = _fake_run(deltas)
    _, _, ach, tau = bisect_threshold(run, 0.45, "units", 0.01, [])
    assert tau == 0.0 and ach["units"] == 0.5 and len(calls) == 1
    run, calls = _fake_run(torch.linspace(0.001, 1, 100).double(), step=0.1)
    _, _, ach, _ = bisect_threshold(run, 0.45, "units", 0.01, [])
    assert abs(abs(ach["units"] - 0.45) - 0.05) < 1e-9  # the best a 10 % granularity allows
    assert len(calls) < 40


def test_stored_starting_states_change_no_decision(monkeypatch):
    """Target mode forks each group's stored starting state when its target columns repeat
    and derives it from the stored one when they changed by a few (``retargeted``); with the
    store disabled (every state rebuilt) the kept units and threshold trace are identical and
    the Δs equal up to rounding, for both closed forms, on a residual net (targets that never
    change) and a plain one (the next layer's kept units: targets that change each pass)."""
    import mipp
    from mipp.estimators.moments import ClosedFormState
    from mipp.methods import MIPP
    from mipp.methods import mipp as mipp_module
    from mipp.zoo import models
    from mipp.zoo.training import seeded

    forks, retargets, full = [0], [0], mipp_module.START_CACHE_BYTES
    fork, retargeted = ClosedFormState.fork, ClosedFormState.retargeted

    def counted(self):
        forks[0] += 1
        return fork(self)

    def counted_retarget(self, moments, columns):
        retargets[0] += 1
        return retargeted(self, moments, columns)

    monkeypatch.setattr(ClosedFormState, "fork", counted)
    monkeypatch.setattr(ClosedFormState, "retargeted", counted_retarget)
    x = torch.randn(256, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    for name in ("resnet20", "lenet5"):
        for estimator in ("gaussian", "linear"):
            runs = []
            for budget in (full, 0):
                monkeypatch.setattr(mipp_module, "START_CACHE_BYTES", budget)
                with seeded(0):
                    net = models.create(name, in_channels=1, input_size=16)
                method = MIPP(estimator=estimator, reconstruct=False)
                runs.append(mipp.prune(net, x, method=method, sparsity=0.6).report)
                if budget == full:
                    # states were reused; LeNet-5's targets change, so some were derived
                    assert forks[0] > 2 * len(runs[0].groups), (name, estimator)
                    assert (retargets[0] > 0) == (name == "lenet5"), (name, estimator)
                else:
                    assert retargets[0] == 0  # nothing stored, nothing derived
                forks[0] = retargets[0] = 0
            cached, rebuilt = runs
            assert cached.bisection == rebuilt.bisection
            for a, b in zip(cached.groups, rebuilt.groups, strict=True):
                assert a.removed == b.removed
                assert torch.allclose(_nan(a.deltas), _nan(b.deltas), rtol=1e-8, atol=1e-12)


def _nan(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).nan_to_num(-1.0)
