"""The automatic pools' policy (kvmc/pool/auto.py), without VMs: which images are kept, the
budget arithmetic over measured costs, trimming, failures, and what ``pool ls`` says."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from kvmc.config import Config
from kvmc.errors import UsageError
from kvmc.pool import Member, Pool, PoolKey
from kvmc.pool.auto import (AutoState, Held, Policy, annotate, available_mib, member_estimate, plan, read_states,
                            record_start, write_state)
from kvmc.pool.common import auto_origin, origin_pid

A = PoolKey(image_id="a" * 64, memory_mib=128, cpus=1, accel="tcg", guest_digest="g", network="user")
B = replace(A, image_id="b" * 64)
NOW = 10_000.0


def _uses(*keys: PoolKey, at: float = NOW, runs: int = 1) -> dict:
    uses: dict = {}
    for key in keys:
        for _ in range(runs):
            record_start(uses, key, f"img-{key.image_id[0]}", pooled=False, ok=True, now=at)
    return uses


def test_an_image_run_once_is_warmed_and_a_full_one_is_kept() -> None:
    uses = _uses(A)
    trims, warm = plan(uses, {}, Policy(budget_mib=1000, size=1), NOW)
    assert trims == [] and warm == A and uses[A].why.startswith("warming")
    trims, warm = plan(uses, {A: Held(members_mib=[30.0], has_template=True)}, Policy(budget_mib=1000, size=1), NOW)
    assert trims == [] and warm is None and uses[A].why == "keeping 1 of 1"


def test_one_member_at_a_time_the_most_recently_used_image_first() -> None:
    uses = _uses(A, at=NOW - 50)
    uses.update(_uses(B, at=NOW - 10))
    _, warm = plan(uses, {}, Policy(budget_mib=10_000, size=2), NOW)
    assert warm == B and uses[A].why.startswith("waiting to warm")


def test_budget_reckons_an_unmeasured_member_and_a_new_template_at_the_guests_ram() -> None:
    uses = _uses(A)
    # clone kind, no template yet: 128 (clone) + 128 (template RAM file) needed
    _, warm = plan(uses, {}, Policy(budget_mib=255, kind="clone"), NOW)
    assert warm is None and "over budget" in uses[A].why and "~256 MiB" in uses[A].why
    _, warm = plan(uses, {}, Policy(budget_mib=256, kind="clone"), NOW)
    assert warm == A
    # hot members need no template
    _, warm = plan(uses, {}, Policy(budget_mib=128, kind="hot"), NOW)
    assert warm == A
    # a template warmed by hand is there: only the clone counts
    _, warm = plan(uses, {A: Held(has_template=True)}, Policy(budget_mib=128, kind="clone"), NOW)
    assert warm == A


def test_budget_uses_what_members_measured() -> None:
    uses = _uses(A)
    held = {A: Held(members_mib=[20.0, 24.0], template_mib=45.0, has_template=True)}
    assert member_estimate(A, held[A]) == 22.0
    # held: 20 + 24 + 45 = 89; a third clone is reckoned at 22 -> 111
    _, warm = plan(uses, held, Policy(budget_mib=111, size=3), NOW)
    assert warm == A
    _, warm = plan(uses, held, Policy(budget_mib=110, size=3), NOW)
    assert warm is None and "over budget" in uses[A].why
    # an unmeasured member counts as the measured mean of its key
    held = {A: Held(members_mib=[20.0, None], has_template=True)}
    _, warm = plan(uses, held, Policy(budget_mib=60, size=3), NOW)
    assert warm == A  # 20 + 20 + 20


def test_a_tiny_budget_keeps_nothing() -> None:
    uses = _uses(A, B)
    trims, warm = plan(uses, {}, Policy(budget_mib=1, size=4), NOW)
    assert trims == [] and warm is None
    assert all("over budget" in u.why for u in uses.values())


def test_over_budget_trims_the_least_recently_used_first() -> None:
    uses = _uses(A, at=NOW - 100)
    uses.update(_uses(B, at=NOW - 5))
    held = {A: Held(members_mib=[60.0]), B: Held(members_mib=[60.0])}
    trims, warm = plan(uses, held, Policy(budget_mib=100, size=1, kind="hot"), NOW)
    assert [t.key for t in trims] == [A] and "over budget" in trims[0].reason and warm is None


def test_an_image_unused_for_a_while_is_trimmed_and_not_warmed() -> None:
    uses = _uses(A, at=NOW - 700)
    trims, warm = plan(uses, {A: Held(members_mib=[30.0], template_mib=40.0)}, Policy(budget_mib=1000, idle_s=600), NOW)
    assert [t.key for t in trims] == [A] and "unused for 700 s" in trims[0].reason and warm is None
    # nothing held: nothing to trim, still not warmed
    trims, warm = plan(uses, {}, Policy(budget_mib=1000, idle_s=600), NOW)
    assert trims == [] and warm is None and "not kept" in uses[A].why


def test_what_another_pool_holds_is_not_trimmed_and_a_held_key_nobody_ran_is() -> None:
    trims, _ = plan({}, {A: Held(has_template=True)}, Policy(budget_mib=1000), NOW)
    assert trims == []  # a template warmed by hand: not this pool's
    trims, _ = plan({}, {A: Held(members_mib=[10.0])}, Policy(budget_mib=1000), NOW)
    assert [t.key for t in trims] == [A]


def test_failed_pooled_starts_stop_the_refill_and_a_success_resets_them() -> None:
    uses = _uses(A)
    for _ in range(2):
        record_start(uses, A, "img-a", pooled=True, ok=False, now=NOW)
    record_start(uses, A, "img-a", pooled=False, ok=False, now=NOW)  # a cold failure is not the pool's
    assert uses[A].failures == 2
    record_start(uses, A, "img-a", pooled=True, ok=True, now=NOW)
    assert uses[A].failures == 0 and uses[A].runs == 2
    for _ in range(3):
        record_start(uses, A, "img-a", pooled=True, ok=False, now=NOW)
    trims, warm = plan(uses, {A: Held(members_mib=[30.0])}, Policy(budget_mib=1000), NOW)
    assert [t.key for t in trims] == [A] and "failed 3 times" in trims[0].reason and warm is None
    assert "failed" in uses[A].why


def test_budget_config_key() -> None:
    assert Config(auto_pool_budget="10%").auto_pool_budget_mib(2000) == 200
    assert Config(auto_pool_budget="512m").auto_pool_budget_mib(2000) == 512
    assert Config(auto_pool_budget="1g").auto_pool_budget_mib(10) == 1024
    assert Config(auto_pool_budget="0").auto_pool_budget_mib(2000) == 0
    assert Config(auto_pool_budget="off").auto_pool_budget_mib(2000) == 0
    for bad in ("lots", "120%", "x%"):
        with pytest.raises(UsageError):
            Config(auto_pool_budget=bad).validate()
    with pytest.raises(UsageError):
        Config(auto_pool_kind="warm").validate()
    assert available_mib("MemTotal: 4096 kB\nMemAvailable:   2048000 kB\n") == 2000


def test_origins() -> None:
    assert origin_pid("") is None and origin_pid(auto_origin(42)) == 42


def test_pool_ls_says_what_the_server_keeps_and_why(tmp_path: Path) -> None:
    uses = _uses(A, B, at=NOW - 30)
    plan(uses, {A: Held(members_mib=[25.0], has_template=True)}, Policy(budget_mib=200, size=1), NOW)
    state = AutoState(pid=7, policy=Policy(budget_mib=200), uses=list(uses.values()))
    write_state(tmp_path, state)
    assert read_states(tmp_path) == [state]
    row = {"mode": "clone", "origin": auto_origin(7), "image": "img-a", "image_id": A.image_id, "memory_mib": 128,
           "cpus": 1, "accel": "tcg", "network": "user", "ready": 1, "why": "auto (serve)"}
    manual = {**row, "origin": "", "mode": "save", "why": "manual (pool warm)"}
    rows = annotate([row, manual], state, {}, now=NOW)
    assert rows[0]["why"] == "auto (serve): last used 30 s ago, 1 run(s); keeping 1 of 1"
    assert rows[1]["why"] == "manual (pool warm)"
    [extra] = rows[2:]  # B: run, nothing kept (over budget), still listed with the reason
    assert extra["image_id"] == B.image_id and extra["ready"] == 0 and "over budget" in extra["why"]


def test_the_cli_claims_no_automatic_member_and_the_server_does(tmp_path: Path) -> None:
    from types import SimpleNamespace

    hv = SimpleNamespace(state=lambda name: "paused")
    pool = Pool(SimpleNamespace(config=SimpleNamespace(data_dir=tmp_path, run_dir=tmp_path / "run"), hv=hv))
    member = Member(id="1" * 64, domain="kvmc-pool-1", uuid="u", key=A, created="now", origin=auto_origin(9),
                    template="t" * 64)
    (pool.root / member.id).mkdir(parents=True)
    (pool.root / member.id / "member.json").write_text(member.to_json())
    assert pool.claim(A, tmp_path / "c1") is None
    offer = pool.claim(A, tmp_path / "c2", auto=True)
    assert offer is not None and offer.hot and offer.record == member
