"""Concurrent generations on the same services do not interfere: each equals its solo run."""

from concurrent.futures import ThreadPoolExecutor

from tests.conftest import PROMPTS


def test_concurrent_generations_equal_their_solo_runs(stacks):
    jobs = [(PROMPTS[i], 10 + 4 * i, {"temperature": 1.0, "seed": i} if i % 2 else {}) for i in range(6)]
    with stacks("noisy").client() as client:
        solo = [client.generate(p, max_new_tokens=n, num_draft_tokens=3, **kw).token_ids for p, n, kw in jobs]
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(
                lambda job: client.generate(job[0], max_new_tokens=job[1], num_draft_tokens=3, **job[2]).token_ids,
                jobs))
    assert together == solo
    assert [len(t) for t in solo] == [n for _, n, _ in jobs]
