"""How a simulation spreads virtual hospitals over the machine's cores."""

import pytest

from fedrad.simulation import plan_actors


@pytest.mark.parametrize(("sites", "cpus", "plan"), [
    (4, 2, (1, 2)),    # fewer cores than sites: one actor on all cores, sites in turn
    (4, 3, (1, 3)),
    (2, 2, (2, 1)),    # a core per site, all at once
    (4, 16, (4, 4)),   # spare cores become threads
    (3, 8, (4, 2)),    # ... never more threads than the cores allow (3 x 2 <= 8; the 4th actor idles)
    (1, 1, (1, 1)),
])
def test_every_core_used_and_none_oversubscribed(sites, cpus, plan):
    parallel, threads = plan_actors(sites, cpus)
    assert (parallel, threads) == plan
    assert parallel * threads <= cpus and threads >= 1
