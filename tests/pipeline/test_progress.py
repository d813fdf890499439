import logging

from commvq.pipeline import progress


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_log_bar_writes_a_line_per_interval_and_one_at_the_end(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="commvq")
    bar = progress.LogBar(total=100, desc="train-values", unit="step", every=30, clock=clock)
    for _ in range(100):
        clock.t += 1
        bar.update(1)
        bar.set_postfix(loss="0.5")
    bar.close()
    bar.close()  # once only
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4  # at 30, 60 and 90 s, then done
    assert lines[0] == "train-values: 30/100 step (30%), 30 s, about 1:10 left, loss 0.5"
    assert lines[-1] == "train-values: done, 100 step in 1:40, loss 0.5"


def test_log_bar_over_an_iterable_and_disabled_or_nested_bars_stay_quiet(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="commvq")
    seen = list(progress.LogBar(range(5), desc="ppl", clock=clock))
    assert seen == list(range(5))
    assert [r.getMessage() for r in caplog.records] == ["ppl: done, 5 it in 0 s"]
    caplog.clear()
    for kw in ({"disable": True}, {"leave": False}):
        bar = progress.LogBar(total=3, desc="layer", clock=clock, **kw)
        clock.t += 100  # however long a nested bar runs
        bar.update(3)
        bar.close()
    assert caplog.records == []


def test_bar_is_tqdm_on_a_terminal_and_lines_elsewhere(monkeypatch):
    from tqdm.auto import tqdm

    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    b = progress.bar(total=3, desc="x", disable=True)
    assert isinstance(b, tqdm)
    b.close()
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    assert isinstance(progress.bar(total=3, desc="x", disable=None), progress.LogBar)
    assert not progress.bar(total=3, disable=None).disable  # tqdm's "terminal only" -> shown


def test_stage_clock_estimates_from_the_stages_that_ran(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="commvq")
    sc = progress.StageClock({"a": 1.0, "b": 1.0, "c": 2.0}, clock=clock)
    assert sc.estimate() is None
    with sc.stage("a"):  # resumed: a few seconds of checks, no evidence (a rerun's stages)
        clock.t += 4.0
    assert sc.estimate() is None
    with sc.stage("b"):
        clock.t += 60
    assert sc.estimate() == 120  # weight 2 left at 60 s per unit of weight
    with sc.stage("c"):
        clock.t += 100
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "[1/3] a: started (job 0 s)"
    assert lines[1] == "[1/3] a: done in 4 s (job 4 s)"
    assert lines[3] == "[2/3] b: done in 1:00 (job 1:04, about 2:00 left)"
    assert lines[-1] == "[3/3] c: done in 1:40 (job 2:44)"


def test_duration():
    got = [progress.duration(s) for s in (0.4, 59, 61, 3600 + 125)]
    assert got == ["0 s", "59 s", "1:01", "1:02:05"]
