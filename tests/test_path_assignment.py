"""Deep Retrieval's M-step (tfrec_recall.training.path_assignment) against references written from the paper.

Gao et al. 2020, "Learning a Retrievable Structure for Large-Scale Recommendations", sec. 3.2-3.3: the M-step
maximises the Jensen upper bound sum_v N_v log sum_j s[v, pi_j(v)] minus alpha * sum_c f(|c|), f(x) = x^4 / 4,
with s[v, c] = sum over the item's interactions of p(c | x_i), by coordinate descent over the items' slots.
"""
import itertools
import unittest

import numpy as np

from tfrec_recall.training.path_assignment import (ScoreAccumulator, assign_paths, fill_unseen_items,
                                                   interaction_scores, top_candidates)


def reference_objective(s, counts, paths, alpha):
    """sum_v N_v * log(sum_j s[v, pi_j(v)]) - alpha * sum_c |c|^4 / 4 (the paper's penalised M-step bound);
    ``s`` a dict (v, c) -> score, ``paths`` [V, J] with -1 for an empty slot."""
    total, sizes = 0.0, {}
    for v, row in enumerate(paths):
        chosen = [c for c in row if c >= 0]
        if chosen:
            total += counts[v] * np.log(sum(s[(v, c)] for c in chosen))
        for c in chosen:
            sizes[c] = sizes.get(c, 0) + 1
    return total - alpha * sum(n ** 4 / 4.0 for n in sizes.values())


def random_scores(rng, num_items=12, codes=(3, 5, 8, 11, 20, 31), per_item=4):
    items, cs, values = [], [], []
    for v in range(num_items):
        for c in rng.choice(codes, size=per_item, replace=False):
            items.append(v), cs.append(int(c)), values.append(float(rng.uniform(0.05, 3.0)))
    counts = rng.integers(1, 6, size=num_items)
    return (np.array(items), np.array(cs), np.array(values), counts,
            {(v, c): x for v, c, x in zip(items, cs, values)})


class TestScoring(unittest.TestCase):
    def test_accumulated_scores_are_sums_of_probabilities(self):
        """s[v, c] = sum_{i: y_i = v} p(c | x_i) over the beams; N_v counts the interactions."""
        rng = np.random.default_rng(0)
        rows = rng.integers(0, 5, size=40)
        codes = rng.integers(0, 6, size=(40, 3))
        log_p = np.log(rng.uniform(0.01, 0.3, size=(40, 3)))
        expected = {}
        for v, cs, lp in zip(rows, codes, log_p):
            for c, x in zip(cs, lp):
                expected[(v, c)] = expected.get((v, c), 0.0) + np.exp(x)
        acc = ScoreAccumulator(num_items=6, compact_every=7)  # compacts several times on the way
        for start in range(0, 40, 9):
            acc.add(rows[start:start + 9], codes[start:start + 9], log_p[start:start + 9])
        result = acc.result(max_candidates=100)
        got = {}
        for v in range(6):
            for k in range(result.offsets[v], result.offsets[v + 1]):
                got[(v, int(result.codes[k]))] = result.scores[k]
        self.assertEqual(set(got), set(expected))
        for key, value in expected.items():
            self.assertAlmostEqual(got[key], value, places=12)
        np.testing.assert_array_equal(result.counts, np.bincount(rows, minlength=6))
        self.assertEqual(result.offsets[6] - result.offsets[5], 0)  # item 5: no interaction, no candidate

    def test_top_candidates_keeps_the_best_per_item(self):
        # item 0: scores 0.5 (code 7), 2.0 (code 1), 1.0 (code 4) -> best two: codes 1, 4
        result = top_candidates([0, 0, 0, 1], [7, 1, 4, 9], [0.5, 2.0, 1.0, 3.0], counts=[3, 1], max_candidates=2)
        np.testing.assert_array_equal(result.offsets, [0, 2, 3])
        np.testing.assert_array_equal(result.codes, [1, 4, 9])
        np.testing.assert_array_equal(result.scores, [2.0, 1.0, 3.0])

    def test_interaction_scores_refuses_mismatched_shapes(self):
        with self.assertRaisesRegex(ValueError, "disagree"):
            interaction_scores([0, 1], np.zeros((2, 3)), np.zeros((2, 2)))

    def test_accumulator_refuses_rows_outside_the_items(self):
        with self.assertRaisesRegex(ValueError, r"item rows must be in \[0, 3\), got \[0, 3\]"):
            ScoreAccumulator(3).add([0, 3], np.zeros((2, 1)), np.zeros((2, 1)))


class TestCoordinateDescent(unittest.TestCase):
    def _scores(self, seed=0):
        items, codes, values, counts, s = random_scores(np.random.default_rng(seed))
        return top_candidates(items, codes, values, counts, max_candidates=10), counts, s

    def test_without_penalty_one_path_is_the_best_scored(self):
        scores, _, s = self._scores()
        got = assign_paths(scores, num_paths=1, alpha=0.0, iterations=2).paths
        for v in range(scores.num_items):
            best = max((x, -c) for (u, c), x in s.items() if u == v)
            self.assertEqual(got[v, 0], -best[1])

    def test_without_penalty_j_paths_are_the_j_best(self):
        scores, _, s = self._scores(1)
        got = assign_paths(scores, num_paths=2, alpha=0.0, iterations=2).paths
        for v in range(scores.num_items):
            ranked = sorted(((x, c) for (u, c), x in s.items() if u == v), reverse=True)
            self.assertEqual(set(got[v]), {ranked[0][1], ranked[1][1]})

    def test_objective_is_the_papers_bound_and_never_decreases(self):
        for seed, alpha in ((2, 0.01), (3, 0.2)):
            scores, counts, s = self._scores(seed)
            result = assign_paths(scores, num_paths=2, alpha=alpha, iterations=6)
            self.assertAlmostEqual(result.objective[-1], reference_objective(s, counts, result.paths, alpha),
                                   places=9)
            self.assertTrue(all(b >= a - 1e-9 for a, b in zip(result.objective, result.objective[1:])),
                            result.objective)

    def test_converged_assignment_is_a_coordinate_optimum(self):
        """No single slot of any item can move to another of its candidates and raise the objective."""
        scores, counts, s = self._scores(4)
        alpha = 0.05
        paths = assign_paths(scores, num_paths=2, alpha=alpha, iterations=12).paths
        base = reference_objective(s, counts, paths, alpha)
        for v, j in itertools.product(range(scores.num_items), range(2)):
            for c in [c for (u, c) in s if u == v and c not in paths[v]]:
                moved = paths.copy()
                moved[v, j] = c
                self.assertLessEqual(reference_objective(s, counts, moved, alpha), base + 1e-9, (v, j, c))

    def test_penalty_flattens_the_path_sizes(self):
        """40 items that all score path 0 best: without the penalty all sit on path 0; with it they spread over
        the 4 candidate paths (the shape of the paper's path-size table)."""
        items = np.repeat(np.arange(40), 4)
        codes = np.tile([0, 1, 2, 3], 40)
        values = np.tile([1.0, 0.9, 0.8, 0.7], 40)
        scores = top_candidates(items, codes, values, counts=np.ones(40), max_candidates=4)
        flat = assign_paths(scores, num_paths=1, alpha=0.0).path_sizes
        spread = assign_paths(scores, num_paths=1, alpha=1e-2).path_sizes
        self.assertEqual(sorted(flat.tolist()), [40])
        self.assertEqual(len(spread), 4)
        self.assertLessEqual(max(spread), 12)  # a perfect spread is 10 per path

    def test_items_with_few_candidates_get_fewer_paths(self):
        scores = top_candidates([0, 1, 1], [5, 2, 3], [1.0, 1.0, 0.5], counts=[1, 2, 0], max_candidates=5)
        paths = assign_paths(scores, num_paths=2).paths
        np.testing.assert_array_equal(paths[0], [5, -1])
        self.assertEqual(set(paths[1]), {2, 3})
        np.testing.assert_array_equal(paths[2], [-1, -1])

    def test_bad_arguments_are_named(self):
        scores, _, _ = self._scores()
        with self.assertRaisesRegex(ValueError, "alpha"):
            assign_paths(scores, alpha=-1.0)
        with self.assertRaisesRegex(ValueError, "num_paths"):
            assign_paths(scores, num_paths=0)
        with self.assertRaisesRegex(ValueError, "exponent must be >= 1"):
            assign_paths(scores, exponent=0.5)


class TestUnseenItems(unittest.TestCase):
    def test_unseen_items_take_their_nearest_trained_items_paths(self):
        paths = np.array([[1, 2], [-1, -1], [7, -1], [-1, -1]])
        vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.2, 3.0]])
        filled, donor = fill_unseen_items(paths, vectors)
        np.testing.assert_array_equal(donor, [0, 0, 2, 2])
        np.testing.assert_array_equal(filled[1], [1, 2])
        np.testing.assert_array_equal(filled[3], [7, -1])

    def test_without_vectors_unseen_items_stay_unreachable(self):
        _, donor = fill_unseen_items(np.array([[1], [-1]]), None)
        np.testing.assert_array_equal(donor, [0, -1])


if __name__ == "__main__":
    unittest.main()
