"""Differential privacy of the rounds: clipping bounds every update, the noise has the standard
deviation the mechanism promises, the accountant's ε is the one computed by hand, and every rule
that cannot run under a mode is refused in one line."""

import math

import pytest
import torch

from fedse.agent.model import load_base
from fedse.agent.policy import Policy
from fedse.experiments.config import ConfigError
from fedse.experiments.federation import Federation
from fedse.fl.aggregators import AGGREGATORS, Aggregation
from fedse.fl.privacy import (
    ORDERS,
    PrivacySection,
    PrivateSeed,
    clip_update,
    dp_refusal,
    epsilon,
    noise_aggregation,
    privatize_update,
    secagg_refusal,
)
from fedse.fl.update import Update, update_norm
from helpers import TINY, random_factors, tiny_config


def test_every_clipped_update_is_within_the_bound():
    current = random_factors(0)
    for seed in range(1, 20):
        sent = Update(f"c{seed}", random_factors(seed).tensors, 10)
        clipped, norm = clip_update(sent, current.tensors, clip=0.5)
        assert update_norm(clipped, current.tensors) <= 0.5
        assert norm == pytest.approx(update_norm(sent, current.tensors))


def test_local_noise_has_standard_deviation_sigma_times_c():
    current = random_factors(0)
    section = PrivacySection(dp="local", clip=0.3, noise_multiplier=2.0)
    same = Update("c", {k: t.clone() for k, t in current.tensors.items()}, 10)  # a zero update: noise only
    draws = torch.cat(
        [
            torch.cat([(t.double() - current.tensors[k].double()).flatten() for k, t in privatize_update(
                same, current.tensors, section, torch.Generator().manual_seed(i)).tensors.items()])
            for i in range(200)
        ]
    )  # fmt: skip
    assert draws.numel() > 20_000
    assert draws.std().item() == pytest.approx(2.0 * 0.3, rel=0.02)
    assert abs(draws.mean().item()) < 0.01


def test_central_noise_is_sigma_c_over_the_clients_that_reported():
    current = random_factors(0)
    section = PrivacySection(dp="central", clip=1.0, noise_multiplier=1.5)
    keys = sorted(current.tensors)
    noisy = [
        noise_aggregation(Aggregation(current), keys, 3, section, torch.Generator().manual_seed(i)).adapter
        for i in range(200)
    ]
    draws = torch.cat([(a.tensors[k].double() - current.tensors[k].double()).flatten() for a in noisy for k in keys])
    assert draws.std().item() == pytest.approx(1.5 * 1.0 / 3, rel=0.02)


def by_hand_epsilon(sigma: float, q: float, rounds: int, delta: float) -> float:
    """RDP of the sampled Gaussian at integer α by its binomial expansion (Mironov et al., 2019),
    times the rounds, then Balle et al.'s (2020) conversion, minimised over the same orders."""
    best = math.inf
    for alpha in ORDERS:
        logs = [  # log of each term C(α,k) (1−q)^(α−k) q^k exp((k²−k)/(2σ²)); q = 1 leaves k = α alone
            math.log(math.comb(alpha, k))
            + ((alpha - k) * math.log(1 - q) if k < alpha else 0.0)
            + k * math.log(q)
            + (k * k - k) / (2 * sigma**2)
            for k in range(alpha + 1)
            if q < 1 or k == alpha
        ]
        top = max(logs)
        rdp = rounds * (top + math.log(sum(math.exp(x - top) for x in logs))) / (alpha - 1)
        eps = rdp - (math.log(delta) + math.log(alpha)) / (alpha - 1) + math.log((alpha - 1) / alpha)
        best = min(best, eps)
    return best


@pytest.mark.parametrize(("sigma", "q", "rounds"), [(1.0, 1.0, 4), (2.0, 1.0, 20), (1.1, 0.1, 50)])
def test_the_accountant_gives_the_epsilon_computed_by_hand(sigma, q, rounds):
    assert epsilon(sigma, rounds, 1e-5, sample_rate=q) == pytest.approx(
        by_hand_epsilon(sigma, q, rounds, 1e-5), rel=1e-6
    )
    # q = 1: the Gaussian mechanism's RDP is rounds · α / (2σ²) in closed form
    if q == 1.0:
        closed = min(
            rounds * a / (2 * sigma**2) - (math.log(1e-5) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
            for a in ORDERS
        )
        assert epsilon(sigma, rounds, 1e-5) == pytest.approx(closed, rel=1e-9)


def test_a_private_seed_is_stable_in_its_folder_and_differs_between_folders(tmp_path):
    a, again, b = PrivateSeed(tmp_path / "a"), PrivateSeed(tmp_path / "a"), PrivateSeed(tmp_path / "b")
    draw = lambda seed: torch.randn(4, generator=seed.generator(2, "maze")).tolist()  # noqa: E731
    assert draw(a) == draw(again) != draw(b)
    assert torch.randn(4, generator=a.generator(3, "maze")).tolist() != draw(a)


@pytest.mark.parametrize("mode", ["central", "local"])
@pytest.mark.parametrize("rule", sorted(AGGREGATORS))
def test_a_rule_that_cannot_run_under_a_mode_is_refused_in_one_line(rule, mode):
    reason = dp_refusal(AGGREGATORS[rule], mode)
    if reason is None:
        tiny_config(f"fed.aggregator={rule}", f"privacy.dp={mode}")
        return
    with pytest.raises(ConfigError) as raised:
        tiny_config(f"fed.aggregator={rule}", f"privacy.dp={mode}")
    assert f"privacy.dp = '{mode}' with fed.aggregator = '{rule}'" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_the_refusals_are_those_the_properties_imply():
    assert dp_refusal(AGGREGATORS["fedse"], "central") is None and dp_refusal(AGGREGATORS["ffa"], "central") is None
    assert dp_refusal(AGGREGATORS["fedsa"], "central") is None
    assert "example counts" in dp_refusal(AGGREGATORS["fedit"], "central")
    assert "not only their sum" in dp_refusal(AGGREGATORS["flora"], "central")
    assert dp_refusal(AGGREGATORS["flora"], "local") is None  # post-processing of noisy factors
    assert "layer inputs" in dp_refusal(AGGREGATORS["regmean"], "local")
    assert "nothing leaves" in dp_refusal(AGGREGATORS["local"], "local")
    assert dp_refusal(AGGREGATORS["fedsa"], "local") is None  # it uploads the shared A, keeps its B
    assert "whole kept adapter" in dp_refusal(AGGREGATORS["personal"], "local")


@pytest.mark.parametrize("dp", ["off", "central", "local"])
@pytest.mark.parametrize("rule", sorted(AGGREGATORS))
def test_a_rule_that_needs_individual_updates_is_refused_secure_aggregation_in_one_line(rule, dp):
    extra = [f"fed.aggregator={rule}", "privacy.secagg=true", f"privacy.dp={dp}"]
    reason = dp_refusal(AGGREGATORS[rule], dp) or secagg_refusal(AGGREGATORS[rule], dp)
    if reason is None:
        tiny_config(*extra)
        return
    with pytest.raises(ConfigError) as raised:
        tiny_config(*extra)
    assert f"fed.aggregator = '{rule}'" in str(raised.value) and reason in str(raised.value)
    assert "\n" not in str(raised.value)


def test_secure_aggregation_serves_exactly_the_rules_that_need_only_an_unweighted_mean():
    served = {name for name, cls in AGGREGATORS.items() if secagg_refusal(cls, "off") is None}
    assert served == {"fedse", "ffa", "fedsa"}
    assert "example counts" in secagg_refusal(AGGREGATORS["fedit"], "off")
    assert secagg_refusal(AGGREGATORS["fedse"], "local") is None
    assert "use dp = 'local'" in secagg_refusal(AGGREGATORS["fedse"], "central")
    for rule in ("flora", "fedex", "median", "trimmed", "subspace", "sum", "regmean"):
        assert "not only their mean" in secagg_refusal(AGGREGATORS[rule], "off")


def test_an_embedded_run_refuses_secure_aggregation_and_creates_nothing(tmp_path, capsys):
    from fedse.cli import main

    sets = [f"--set={s}" for s in TINY]
    assert main(["run", "--runs-dir", str(tmp_path / "runs"), "--name", "r", *sets, "--set=privacy.secagg=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert "privacy.secagg = true needs clients on other machines" in err and "\n" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("mode", ["central", "local"])
def test_a_private_run_records_epsilon_each_round_and_keeps_its_secrets_to_itself(tmp_path, mode):
    config = tiny_config(f"privacy.dp={mode}", "privacy.noise_multiplier=1.0", "privacy.clip=0.5")
    private = Federation(config, tmp_path / "private", Policy(load_base("tiny-random")))
    private.run()
    spent = [r.privacy for r in private.store.records() if r.event == "aggregate"]
    assert [p["dp"] for p in spent] == [mode, mode]
    assert [p["epsilon"] for p in spent] == pytest.approx([epsilon(1.0, n, 1e-5) for n in (1, 2)])
    assert spent[0]["epsilon"] < spent[1]["epsilon"] and spent[0]["round_epsilon"] == pytest.approx(spent[0]["epsilon"])
    plain = Federation(tiny_config(), tmp_path / "plain", Policy(load_base("tiny-random")))
    plain.run()
    assert private.global_adapter.hash != plain.global_adapter.hash  # the noise is in the adapter
    holder = tmp_path / "private" if mode == "central" else tmp_path / "private" / "clients" / "maze"
    secret = (holder / "dp_secret").read_text().strip()
    assert len(secret) == 64
    shared = [tmp_path / "private" / n for n in ("config.json", "metrics.jsonl", "state.json")]
    assert all(secret not in p.read_text() for p in shared)


def test_exposure_is_the_secrets_rank_among_the_candidates_in_bits():
    from fedse.experiments.leakage import exposure_of

    others = [10.0 + i for i in range(7)]  # 10 … 16
    best = exposure_of(1.0, others)
    assert best["rank"] == 1 and best["exposure"] == pytest.approx(3.0)  # log2(8) − log2(1): the cap
    assert best["exposure_fit"] > 3.0  # the normal fit goes past the cap the candidates set
    middle = exposure_of(13.0, others)
    assert middle["rank"] == 4 and middle["exposure"] == pytest.approx(1.0)
    assert middle["exposure_fit"] == pytest.approx(1.0)  # the secret at the candidates' mean: P = 1/2
    worst = exposure_of(99.0, others)
    assert worst["rank"] == 8 and worst["exposure"] == pytest.approx(0.0)


def test_membership_auc_is_the_probability_a_member_scores_higher():
    from fedse.experiments.leakage import auc

    assert auc([3.0, 4.0], [1.0, 2.0]) == 1.0 and auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert auc([1.0, 3.0], [2.0, 2.0]) == 0.5 and auc([2.0], [2.0]) == 0.5


def test_a_planted_canary_is_in_one_agent_turn_and_each_candidate_replaces_only_it():
    from fedse.evolve.experts import expert_trajectory
    from fedse.experiments.leakage import canary_text, plant, with_secret

    demo = expert_trajectory("maze", 0)
    (canary,) = plant([demo], ["123456"])
    text = "\n".join(m["content"] for m in canary.messages)
    assert text.count(canary_text("123456")) == 1 and canary.messages[3]["content"].startswith(canary_text("123456"))
    assert (
        canary.messages[3]["content"].endswith(demo.messages[3]["content"]) and demo.messages[3] != canary.messages[3]
    )
    swapped = with_secret(canary, "123456", "654321")
    assert len(swapped.messages) == 4 and swapped.messages[:3] == canary.messages[:3]
    assert swapped.messages[3]["content"] == canary.messages[3]["content"].replace("123456", "654321")


def test_episode_nll_is_the_summed_nll_of_each_episode_alone(tmp_path):
    """Batched scoring gives each episode what scoring it alone gives (padding changes nothing)."""
    from fedse.evolve.experts import expert_trajectory
    from fedse.evolve.sft import episode_nll

    policy = Policy(load_base("tiny-random"))
    episodes = [expert_trajectory("maze", i) for i in range(3)]
    together = episode_nll(policy, None, episodes, max_length=512, batch=3)
    alone = [episode_nll(policy, None, [e], max_length=512)[0] for e in episodes]
    assert [n for _, n in together] == [n for _, n in alone] and all(n > 0 for _, n in alone)
    assert [s for s, _ in together] == pytest.approx([s for s, _ in alone], rel=1e-4)


def test_the_privacy_bench_adds_one_leakage_section_to_each_runs_report(tmp_path):
    """bench/privacy.py on the tiny model: every run's metrics gain one leakage record (not a second
    when the bench runs again), holding the figures of the bench's own table, and its report shows them."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from fedse.experiments.store import RunStore

    bench = Path(__file__).resolve().parents[1] / "bench" / "privacy.py"
    command = [sys.executable, str(bench), "--tiny", "--out", str(tmp_path), "--candidates", "6", "--canaries", "2",
               "--sigmas", "1.0"]  # fmt: skip
    for _ in range(2):
        subprocess.run(command, check=True, capture_output=True)
    result = json.loads((tmp_path / "privacy.json").read_text())
    for name, folder in (("dp off", "dp-off"), ("central σ=1", "central-sigma1")):
        (leakage,) = RunStore(tmp_path / folder).load().leakage
        row = result["runs"][name]
        assert leakage.exposure["global"] == [c["exposure"] for c in row["global"]]
        assert leakage.exposure_fit["own"] == [c["exposure_fit"] for c in row["own"]]
        assert leakage.membership_auc == {"base": result["base_auc"], "global": row["auc"]}
        assert leakage.round == 2 and leakage.candidates == 6 and leakage.members == 4
        report = (tmp_path / folder / "report.md").read_text()
        assert "### Leakage" in report
        assert f"| global adapter | {sum(leakage.exposure['global']) / 2:.2f} |" in report
