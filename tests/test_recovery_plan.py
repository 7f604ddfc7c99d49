"""plan_recovery: the latest step every shard has, own memory first, disk as the last resort; for a
shard that comes from a replica, every live holder of that step in order."""
import pytest

from fftrainer_ds.errors import TerminalError
from fftrainer_ds.failover.recovery import RankInfo, plan_recovery


def test_replacement_gets_its_shard_from_the_holder_at_the_common_step():
    infos = [RankInfo(0, False, [9, 10], {3: [9]}),
             RankInfo(1, True, [], {}),
             RankInfo(2, False, [9, 10], {1: [10]}),
             RankInfo(3, False, [9, 10], {2: [10]})]
    plan = plan_recovery(infos, 4)
    assert plan.step == 10
    assert plan.source == {0: ("own", 0), 1: ("replica", 2), 2: ("own", 2), 3: ("own", 3)}
    assert plan.holders == {1: [2]}


def test_lagging_replica_rolls_everyone_back_one_step():
    infos = [RankInfo(0, False, [9, 10], {}), RankInfo(1, True, [], {}), RankInfo(2, False, [9, 10], {1: [9]})]
    plan = plan_recovery(infos, 3)
    assert plan.step == 9 and plan.source[1] == ("replica", 2) and plan.source[0] == ("own", 0)


def test_two_failures_with_k2_use_the_surviving_holder():
    # ranks 1 and 2 died; 1's replicas were on 2 (dead) and 3; 2's on 3 and 0.
    infos = [RankInfo(0, False, [4, 5], {2: [5], 3: [5]}), RankInfo(1, True, [], {}), RankInfo(2, True, [], {}),
             RankInfo(3, False, [4, 5], {1: [5], 2: [5]})]
    plan = plan_recovery(infos, 4)
    assert plan.step == 5 and plan.source[1] == ("replica", 3) and plan.source[2] == ("replica", 0)
    assert plan.holders == {1: [3], 2: [0, 3]}


def test_holders_are_every_live_holder_of_the_step_lowest_first():
    # k=3: rank 1's replica is on 0, 2 and 3, but 2's copy lags a step; rank 4 holds nothing of it.
    infos = [RankInfo(0, False, [6, 7], {1: [6, 7]}), RankInfo(1, True, [], {}),
             RankInfo(2, False, [6, 7], {1: [6]}), RankInfo(3, False, [6, 7], {1: [7], 4: [7]}),
             RankInfo(4, False, [6, 7], {})]
    plan = plan_recovery(infos, 5)
    assert plan.step == 7 and plan.source[1] == ("replica", 0)
    assert plan.holders == {1: [0, 3]}  # the first is the source; no list for ranks with their own copy
    # The same infos in another order give the same plan: every rank computes it alone.
    assert plan_recovery(list(reversed(infos)), 5) == plan


def test_lost_replica_set_falls_back_to_disk():
    infos = [RankInfo(0, False, [9, 10], {}, disk_steps=[5]), RankInfo(1, True, [], {}, disk_steps=[5])]
    plan = plan_recovery(infos, 2)
    assert plan.step == 5 and plan.from_disk and plan.holders == {}


def test_nothing_left_is_terminal_and_says_why():
    infos = [RankInfo(0, False, [9, 10], {}), RankInfo(1, True, [], {})]
    with pytest.raises(TerminalError, match=r"ranks \[1\].*persist_dir"):
        plan_recovery(infos, 2)


def test_no_common_step_names_every_shards_steps():
    # every shard has a copy, but at different steps (what one retained replica version per source allowed)
    infos = [RankInfo(0, False, [9, 10], {2: [8]}), RankInfo(1, False, [9, 10], {0: [8]}),
             RankInfo(2, True, [], {})]
    with pytest.raises(TerminalError, match=r"no step is held for every shard .*rank 0: \[8, 9, 10\]; "
                                            r"rank 1: \[9, 10\]; rank 2: \[8\]"):
        plan_recovery(infos, 3)


def test_two_retained_replica_versions_give_a_common_step_whatever_the_lags():
    # lag <= 1 and two committed versions per source: shard 1 seen at 9-10 on one holder, shard 2 at 8-9
    infos = [RankInfo(0, False, [8, 9, 10], {1: [9, 10], 2: [8, 9]}), RankInfo(1, True, [], {}),
             RankInfo(2, True, [], {}), RankInfo(3, False, [9, 10], {1: [9, 10], 2: [8, 9]})]
    plan = plan_recovery(infos, 4)
    assert plan.step == 9 and plan.source[1] == ("replica", 0) and plan.source[2] == ("replica", 0)
