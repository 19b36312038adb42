"""VPL as a reward for online RL (``reward.vpl``; docs/vpl.md): a trained VPL reward model r(e, z) with each user's
latent z inferred from a few of that user's labelled pairs.

:class:`VPLScorer` holds the model, one latent per user (z_u = mu of q(z | C_u), the posterior mean over the user's
context set C_u: no sampling, as VPL evaluates) and the embedding function e(prompt, response) the model was
trained on. A rollout row's user is its prompt row's ``user`` field (``reward.vpl.user_field``); its reward is
r(e(prompt, response), z_user).

As reward sources it is one part per user (``vpl_<user>``): the part scores its user's rows and gives 0 to the
others, so the parts add up to the VPL reward of every row and ``rollout/reward_vpl_<user>_mean`` is that user's
share of the step's mean reward (the user's rows' rewards summed, over all rows). A row whose user has no latent
stops the run with the user, the field and the users the context file holds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from alignflow.algorithms.vpl import VPLRewardModel
from alignflow.batch import Batch
from alignflow.rewards.base import output_device
from alignflow.rewards.rules import RewardError

EmbedFn = Callable[[list[str], list[str]], torch.Tensor]  # (prompts, responses) -> (N, D) float32


class VPLScorer:
    """r(e(x, y), z_u) for rows of known users (module docstring). ``latents``: user -> (L,) tensor."""

    def __init__(self, model: VPLRewardModel, latents: dict[str, torch.Tensor], embed: EmbedFn, user_field: str):
        self.model, self.latents, self.embed, self.user_field = model.eval(), latents, embed, user_field

    def users_of(self, batch: Batch) -> list[str]:
        got = batch.meta.get(self.user_field)
        if got is None:
            raise RewardError(
                f"reward.vpl: the prompt rows have no field {self.user_field!r} naming each row's user "
                "(reward.vpl.user_field)",
                fn_name="vpl",
            )
        for i, u in enumerate(got):
            if u not in self.latents:
                raise RewardError(
                    f"reward.vpl: row {i}: field {self.user_field!r} = {u!r} has no context pairs; the context "
                    f"holds users {', '.join(sorted(self.latents))}",
                    fn_name="vpl",
                    row=i,
                )
        return list(got)

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], users: list[str]) -> torch.Tensor:
        """(N,) VPL rewards of (prompt, response) rows of the given users."""
        if not prompts:
            return torch.zeros(0)
        emb = self.embed(list(prompts), list(responses)).float()  # (N, D)
        z = torch.stack([self.latents[u] for u in users])  # (N, L)
        return self.model.reward(emb, z).float()


class VPLUserPart:
    """The VPL reward of one user's rows, 0 elsewhere (a reward source; module docstring)."""

    def __init__(self, scorer: VPLScorer, user: str):
        self.scorer, self.user, self.name = scorer, user, f"vpl_{user}"

    def __call__(self, batch: Batch) -> torch.Tensor:
        users = self.scorer.users_of(batch)
        rows = [i for i, u in enumerate(users) if u == self.user]
        out = torch.zeros(len(batch))
        if rows:
            prompts, responses = batch.meta["prompt"], batch.meta["response"]
            out[rows] = self.scorer.score(
                [prompts[i] for i in rows], [responses[i] for i in rows], [self.user] * len(rows)
            )
        return out.to(output_device(batch))


def vpl_parts(scorer: VPLScorer, weight: float) -> list[tuple[str, VPLUserPart, float]]:
    """(name, source, weight) per user of the scorer, for a CompositeReward."""
    return [(f"vpl_{u}", VPLUserPart(scorer, u), weight) for u in sorted(scorer.latents)]
