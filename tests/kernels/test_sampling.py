"""Token choice: top-k / top-p filtering against a per-row slow version, greedy, seeded reproducibility."""
import torch

from moeserve.kernels.sampling import draw, filter_logits, sample


def slow_filter(row, temperature, top_k, top_p):
    row = row / temperature
    order = sorted(range(len(row)), key=lambda i: -row[i])
    if top_k > 0:
        order = order[:top_k]
    probs = torch.softmax(row[order], dim=0).tolist()
    kept, mass = [], 0.0
    for i, p in zip(order, probs):
        if mass >= top_p:
            break
        kept.append(i)
        mass += p
    out = torch.full_like(row, float("-inf"))
    out[kept] = row[kept]
    return out


def test_filter_matches_the_slow_version_row_by_row():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    temperature = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.7, 1.3])
    top_k = torch.tensor([0, 5, 0, 1, 10, 3])
    top_p = torch.tensor([1.0, 1.0, 0.6, 0.9, 0.3, 0.95])
    fast = filter_logits(logits, temperature, top_k, top_p)
    for b in range(6):
        assert torch.equal(fast[b], slow_filter(logits[b], temperature[b], int(top_k[b]), float(top_p[b])))


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = filter_logits(logits, torch.ones(1), torch.zeros(1, dtype=torch.long), torch.tensor([0.8])).isfinite()
    assert kept.tolist() == [[True, True, False, False]]


def test_greedy_rows_take_the_argmax_and_seeded_rows_repeat():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample(logits, [0.0] * 3), logits.argmax(-1))
    draws = [sample(logits, [1.0] * 3, generators=[torch.Generator().manual_seed(s) for s in (1, 2, 3)])
             for _ in range(2)]
    assert torch.equal(draws[0], draws[1])


def test_sampling_frequencies_follow_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sample(probs.log()[None], [1.0], generators=[g])[0]] += 1
    assert torch.allclose(counts / 3000, probs, atol=0.03)  # ~3.5 standard deviations of the 0.6 bin


def test_a_draft_raced_with_the_targets_noise_agrees_as_often_as_the_race_predicts():
    """The exponential race couples an MTP draft (from q) and the target (from p) at one position: each trial draws
    both with one noise. The target's token, the one kept, is distributed as p whatever q is, and the two agree
    with probability sum_i 1 / sum_j max(p_j / p_i, q_j / q_i) (token i wins both races iff every E_j exceeds
    E_i times both ratios; integrate over E_i ~ Exp(1))."""
    p = torch.tensor([0.5, 0.25, 0.15, 0.1])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])  # a poor draft distribution: many disagreements
    predicted = sum(1 / sum(max(p[j] / p[i], q[j] / q[i]) for j in range(4)) for i in range(4)).item()
    n = 4000
    g = torch.Generator()
    targets, agreed = torch.zeros(4), 0
    for trial in range(n):
        target = draw(p[None], [g.manual_seed(trial)])[0]
        draft = draw(q[None], [g.manual_seed(trial)])[0]
        targets[target] += 1
        agreed += int(target == draft)
    assert torch.allclose(targets / n, p, atol=0.03)  # binomial sd <= 0.008 per bin
    assert abs(agreed / n - predicted) < 0.03, (agreed / n, predicted)  # sd about 0.008; independent noise: 0.185
    same = sum(int(draw(p[None], [g.manual_seed(t)])[0] == draw(p[None], [g.manual_seed(t)])[0]) for t in range(50))
    assert same == 50  # one distribution, one noise: one token


def test_a_row_with_no_distribution_is_marked_not_drawn():
    probs = torch.tensor([[0.2, 0.8], [float("nan"), 1.0], [0.0, 0.0]])
    assert draw(probs, [torch.Generator().manual_seed(0)] * 3).tolist()[1:] == [-1, -1]
