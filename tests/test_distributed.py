"""jax's multi-process CPU path as the project meets it: the releases whose collectives hang in the reproducer
(tests/jax_cpu_collective_hangs.py, no project code) are the releases on which `distributed.initialize` works
around them. The day a release in that range stops hanging, or one outside it starts, this fails and says which way."""

import jax
import jax_cpu_collective_hangs
import pytest

from clinkd_jax import distributed


@pytest.mark.slow
@pytest.mark.multihost
@pytest.mark.parametrize("case", ["cache", "paths"])
def test_the_workaround_covers_exactly_the_releases_that_hang(case):
    """cache: round 1 compiles, round 2 loads from the persistent cache (hangs on 0.12.1; the project turns the
    cache off). paths: round 1 from two file paths (hangs on 0.12.1), round 2 with the source paths canonical, as
    the project sets them (finishes everywhere: the workaround works)."""
    (first, s1, out1), (second, s2, out2) = jax_cpu_collective_hangs.run(case, deadline=40.0)  # 1-4 s when quiet
    predicted = distributed.cpu_collectives_hang()
    hung = not second if case == "cache" else not first
    fix_works = first if case == "cache" else second
    assert fix_works, f"{case}: the round without the faulty path did not finish in 40 s:\n{(out1, out2)}"
    assert hung == predicted, (
        f"jax {jax.__version__}, {case}: the collective {'hangs' if hung else 'finishes'} but "
        f"clinkd_jax.distributed.CPU_HANGS_FROM={distributed.CPU_HANGS_FROM} says it "
        f"{'does not' if hung else 'does'}: update the range (and docs/jax-cpu-collective-hangs.md)\n"
        f"{(out1 if case == 'paths' else out2)[-3000:]}")


def test_release_numbers_compare_as_numbers(monkeypatch):
    for version, hangs in (("0.10.2", False), ("0.12.0.1", False), ("0.12.1", True), ("0.12.10", True),
                           ("0.13.0.dev20270101", True)):
        monkeypatch.setattr(jax, "__version__", version)
        assert distributed.cpu_collectives_hang() == hangs, version


def test_a_collective_timeout_must_be_positive():
    with pytest.raises(distributed.UserError, match="--collective_timeout=0.0 must be a positive"):
        distributed.initialize(collective_timeout_s=0.0)
